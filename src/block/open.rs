//! Opening a disk by its `format=` option: the one place that maps formats to back ends.

use super::{BlockBackend, BlockError, BlockOptions, ImageFormat, Qcow2Image, RawImage};
use std::sync::Arc;

/// Opens the image `options` describe in the format they name (raw when none is named:
/// the contents never decide).
pub fn open_image(options: &BlockOptions) -> Result<Arc<dyn BlockBackend>, BlockError> {
    Ok(match options.format {
        ImageFormat::Raw => Arc::new(RawImage::open(options)?),
        ImageFormat::Qcow2 => Arc::new(Qcow2Image::open(options)?),
    })
}
