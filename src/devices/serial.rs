//! The LPC bridge's 16550 UARTs (COM1, COM2), on vm-superio's register model.
//!
//! Output goes straight to the back end's writer and into a 4 KiB ring of recent output the
//! VMM can print after a crash. Input comes from one thread per port that feeds the receive
//! FIFO and, while the FIFO is full, sleeps on a condition variable that the guest's reads of
//! the data register signal: nothing spins and nothing is dropped.

use std::convert::Infallible;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vm_superio::serial::{Error as UartError, SerialEvents};
use vm_superio::{Serial, Trigger};

use super::bus::{lock, BusDevice};
use super::irq::InterruptLine;
use super::terminal::{Terminal, TerminalError, TerminalHold};

/// One COM port: `-l comN,TERMINAL[,log=PATH][,asl]` (HyperKit's chained form).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialConfig {
    /// Where the port's bytes go and come from.
    pub backend: SerialBackend,
    /// `log=PATH`: HyperKit's console ring, a 64 KiB memory-mapped file of the latest output.
    pub log_ring: Option<PathBuf>,
    /// `asl`: output also goes to the macOS system log, a line at a time.
    pub asl: bool,
}

impl SerialConfig {
    /// A port on `backend` with no log ring and no system log.
    pub fn new(backend: SerialBackend) -> Self {
        SerialConfig {
            backend,
            log_ring: None,
            asl: false,
        }
    }
}

/// Where a COM port's bytes go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialBackend {
    /// The terminal `xhyve` runs in, in raw mode (restored on every exit).
    Stdio,
    /// A new pseudo-terminal; its name is printed as `COMn connected to /dev/pts/N`.
    /// `autopty=PATH` also makes a symlink at PATH to it, removed on exit.
    Autopty(Option<PathBuf>),
    /// `null`: output is dropped, there is no input (HyperKit).
    Null,
    /// An existing terminal device.
    Tty(PathBuf),
}

/// Number of I/O ports a 16550 decodes.
pub const UART_PORT_COUNT: u64 = 8;
/// Bytes of recent guest output kept for crash reports.
pub const OUTPUT_RING_SIZE: usize = 4096;

/// COM port resources as xhyve's LPC bridge assigns them: `(base port, ISA IRQ)`.
pub fn com_resources(com: u8) -> Option<(u16, u32)> {
    match com {
        1 => Some((0x3F8, 4)),
        2 => Some((0x2F8, 3)),
        _ => None,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("invalid COM port {0}: must be 1 or 2")]
    BadComPort(u8),
    #[error(transparent)]
    Terminal(#[from] TerminalError),
    #[error("cannot start the COM{com} input thread: {source}")]
    Thread {
        com: u8,
        #[source]
        source: io::Error,
    },
}

/// Raises the UART's ISA interrupt as an edge.
struct IrqTrigger(Arc<dyn InterruptLine>);

impl Trigger for IrqTrigger {
    type E = Infallible;

    fn trigger(&self) -> Result<(), Infallible> {
        self.0.pulse();
        Ok(())
    }
}

/// Wakes the input thread when the guest makes room in the receive FIFO.
#[derive(Default)]
struct FifoSpace {
    space: Condvar,
    /// Set by the input thread (under the device lock) before it waits, so the guest's
    /// reads only pay for a wake-up when someone is waiting.
    waiting: AtomicBool,
}

impl SerialEvents for FifoSpace {
    fn buffer_read(&self) {
        if self.waiting.swap(false, Ordering::Relaxed) {
            self.space.notify_one();
        }
    }
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {}
}

/// The last `OUTPUT_RING_SIZE` bytes written, without allocating as it records.
struct OutputRing {
    bytes: [u8; OUTPUT_RING_SIZE],
    next: usize,
    wrapped: bool,
}

impl OutputRing {
    fn new() -> Self {
        OutputRing {
            bytes: [0; OUTPUT_RING_SIZE],
            next: 0,
            wrapped: false,
        }
    }

    fn record(&mut self, data: &[u8]) {
        for &b in data {
            self.bytes[self.next] = b;
            self.next = (self.next + 1) % OUTPUT_RING_SIZE;
            if self.next == 0 {
                self.wrapped = true;
            }
        }
    }

    fn contents(&self) -> Vec<u8> {
        if self.wrapped {
            let mut v = self.bytes[self.next..].to_vec();
            v.extend_from_slice(&self.bytes[..self.next]);
            v
        } else {
            self.bytes[..self.next].to_vec()
        }
    }
}

/// Sends output to the back end and keeps a copy of the tail.
struct TeeWriter {
    out: Box<dyn Write + Send>,
    ring: OutputRing,
}

impl Write for TeeWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Record even what the back end refuses: the ring is for diagnosing the guest.
        self.ring.record(buf);
        self.out.write_all(buf).map(|()| buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// One 16550 on the port bus (8 ports from its base).
pub struct SerialDevice {
    uart: Serial<IrqTrigger, Arc<FifoSpace>, TeeWriter>,
}

impl SerialDevice {
    /// The last guest output, oldest byte first (at most `OUTPUT_RING_SIZE` bytes).
    pub fn last_output(&self) -> Vec<u8> {
        self.uart.writer().ring.contents()
    }
}

/// A 16550 reset: every register at its power-on value and the receive FIFO empty. The
/// output back end and its recorded tail stay: the console is the same cable.
impl super::PowerOnReset for SerialDevice {
    fn power_on_reset(&mut self) {
        let trigger = IrqTrigger(self.uart.interrupt_evt().0.clone());
        let events = self.uart.events().clone();
        let writer = self.uart.writer_mut();
        let writer = TeeWriter {
            out: std::mem::replace(&mut writer.out, Box::new(io::sink())),
            ring: std::mem::replace(&mut writer.ring, OutputRing::new()),
        };
        self.uart = Serial::with_events(trigger, events, writer);
        // The input thread may wait for room that the emptied FIFO now has.
        self.uart.events().space.notify_one();
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), Ok(reg)) = (data.first_mut(), u8::try_from(offset)) {
            if offset < UART_PORT_COUNT {
                *first = self.uart.read(reg);
            }
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let (Some(&value), Ok(reg)) = (data.first(), u8::try_from(offset)) {
            if offset < UART_PORT_COUNT {
                // A back end that refuses output loses the byte, as an unplugged line would.
                let _ = self.uart.write(reg, value);
            }
        }
    }
}

/// A COM port: the UART device plus the thread that feeds it input.
pub struct SerialPort {
    device: Arc<Mutex<SerialDevice>>,
    fifo_space: Arc<FifoSpace>,
    stop: Arc<AtomicBool>,
    input_thread: Option<JoinHandle<()>>,
    pty_path: Option<PathBuf>,
    _hold: Option<TerminalHold>,
}

impl SerialPort {
    /// Opens `backend` for COM`com` (1 or 2) and starts its input thread.
    pub fn open(
        config: &SerialConfig,
        com: u8,
        irq: Arc<dyn InterruptLine>,
    ) -> Result<SerialPort, SerialError> {
        if com_resources(com).is_none() {
            return Err(SerialError::BadComPort(com));
        }
        let (output, input, pty_path, hold) = Terminal::open_config(config, com)?.into_parts();
        let stop = input.as_ref().map(|r| r.stop_flag()).unwrap_or_default();
        let input = input.map(|r| Box::new(r) as Box<dyn Read + Send>);
        let mut port = Self::start(com, output, input, stop, irq)?;
        port.pty_path = pty_path;
        port._hold = Some(hold);
        Ok(port)
    }

    /// A port over any writer and reader (tests, other back ends). The input thread stops
    /// when `input` reaches end-of-file or fails, or after its next read once dropped.
    pub fn with_io(
        com: u8,
        output: Box<dyn Write + Send>,
        input: Option<Box<dyn Read + Send>>,
        irq: Arc<dyn InterruptLine>,
    ) -> Result<SerialPort, SerialError> {
        Self::start(com, output, input, Arc::default(), irq)
    }

    fn start(
        com: u8,
        output: Box<dyn Write + Send>,
        input: Option<Box<dyn Read + Send>>,
        stop: Arc<AtomicBool>,
        irq: Arc<dyn InterruptLine>,
    ) -> Result<SerialPort, SerialError> {
        let fifo_space = Arc::new(FifoSpace::default());
        let writer = TeeWriter {
            out: output,
            ring: OutputRing::new(),
        };
        let uart = Serial::with_events(IrqTrigger(irq), fifo_space.clone(), writer);
        let device = Arc::new(Mutex::new(SerialDevice { uart }));
        let input_thread = match input {
            Some(reader) => {
                let (device, fifo_space, stop) = (device.clone(), fifo_space.clone(), stop.clone());
                let thread = std::thread::Builder::new()
                    .name(format!("com{com}-input"))
                    .spawn(move || pump_input(reader, &device, &fifo_space, &stop))
                    .map_err(|source| SerialError::Thread { com, source })?;
                Some(thread)
            }
            None => None,
        };
        Ok(SerialPort {
            device,
            fifo_space,
            stop,
            input_thread,
            pty_path: None,
            _hold: None,
        })
    }

    /// The device to insert on the port bus at `com_resources(com).0`, `UART_PORT_COUNT` ports.
    pub fn device(&self) -> Arc<Mutex<SerialDevice>> {
        self.device.clone()
    }

    /// The last guest output, oldest byte first.
    pub fn last_output(&self) -> Vec<u8> {
        lock(&self.device).last_output()
    }

    /// The pseudo-terminal a client should open, for `autopty`.
    pub fn pty_path(&self) -> Option<&Path> {
        self.pty_path.as_deref()
    }

    /// Whether the input thread has finished (end of input, error or stop).
    pub fn input_finished(&self) -> bool {
        self.input_thread.as_ref().is_none_or(|t| t.is_finished())
    }
}

impl Drop for SerialPort {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Take the lock so the notification cannot slip between the thread's check and wait.
        let _guard = lock(&self.device);
        self.fifo_space.space.notify_all();
        // The thread is not joined: it may sit in a blocking read of a back end that cannot be
        // interrupted. It exits at its next wake-up.
    }
}

/// Upper bound on one wait for FIFO space, so a stop request is always seen.
const FIFO_WAIT: Duration = Duration::from_millis(100);

fn pump_input(
    mut reader: Box<dyn Read + Send>,
    device: &Mutex<SerialDevice>,
    fifo_space: &FifoSpace,
    stop: &AtomicBool,
) {
    let mut buf = [0u8; 64];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let mut pending = &buf[..n];
        let mut dev = lock(device);
        while !pending.is_empty() {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            match dev.uart.enqueue_raw_bytes(pending) {
                // Zero bytes taken: the UART is in loopback mode and accepts no line input.
                Ok(taken) if taken > 0 => pending = &pending[taken..],
                Ok(_) | Err(UartError::FullFifo) => {
                    fifo_space.waiting.store(true, Ordering::Relaxed);
                    dev = match fifo_space.space.wait_timeout(dev, FIFO_WAIT) {
                        Ok((guard, _)) => guard,
                        Err(poisoned) => poisoned.into_inner().0,
                    };
                }
                Err(_) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::irq::test_util::RecordingLine;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::time::Instant;

    const DATA: u64 = 0;
    const IER: u64 = 1;
    const LSR: u64 = 5;
    const LSR_DATA_READY: u8 = 0x01;

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);
    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn read_reg(dev: &Mutex<SerialDevice>, reg: u64) -> u8 {
        let mut d = [0xAAu8];
        lock(dev).read(0x3F8, reg, &mut d);
        d[0]
    }

    fn write_reg(dev: &Mutex<SerialDevice>, reg: u64, v: u8) {
        lock(dev).write(0x3F8, reg, &[v]);
    }

    /// Reads `count` bytes from the receive register, waiting for each to arrive.
    fn receive(dev: &Mutex<SerialDevice>, count: usize) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        while got.len() < count {
            assert!(Instant::now() < deadline, "received only {got:?}");
            if read_reg(dev, LSR) & LSR_DATA_READY != 0 {
                got.push(read_reg(dev, DATA));
            } else {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        got
    }

    #[test]
    fn guest_output_reaches_writer_and_ring() {
        let out = SharedBuf::default();
        let line = Arc::new(RecordingLine::default());
        let port = SerialPort::with_io(1, Box::new(out.clone()), None, line).unwrap();
        let dev = port.device();
        for &b in b"hello" {
            write_reg(&dev, DATA, b);
        }
        assert_eq!(*out.0.lock().unwrap(), b"hello");
        assert_eq!(port.last_output(), b"hello");
    }

    #[test]
    fn a_machine_reset_restores_the_registers_and_keeps_the_console() {
        let out = SharedBuf::default();
        let line = Arc::new(RecordingLine::default());
        let port = SerialPort::with_io(1, Box::new(out.clone()), None, line).unwrap();
        let dev = port.device();
        let fresh: Vec<u8> = (1..8).map(|r| read_reg(&dev, r)).collect();
        write_reg(&dev, 3, 0x80); // DLAB, divisor 1
        write_reg(&dev, DATA, 0x01);
        write_reg(&dev, 3, 0x1B); // 8E1
        write_reg(&dev, IER, 0x05);
        write_reg(&dev, 4, 0x1F); // loopback
        write_reg(&dev, 7, 0x42);
        lock(&dev).uart.enqueue_raw_bytes(b"typed").unwrap();
        write_reg(&dev, 4, 0x0B);
        write_reg(&dev, DATA, b'x');
        crate::devices::PowerOnReset::power_on_reset(&mut *lock(&dev));
        let after: Vec<u8> = (1..8).map(|r| read_reg(&dev, r)).collect();
        assert_eq!(after, fresh, "IER..SCR at power-on, receive FIFO empty");
        write_reg(&dev, 3, 0x80);
        assert_eq!(read_reg(&dev, DATA), fresh_divisor_low(), "divisor back");
        write_reg(&dev, 3, 0x03);
        write_reg(&dev, DATA, b'y');
        assert_eq!(*out.0.lock().unwrap(), b"xy", "the same back end");
        assert_eq!(port.last_output(), b"xy", "the tail survives");
    }

    /// The divisor latch's low byte vm-superio starts with.
    fn fresh_divisor_low() -> u8 {
        let port = SerialPort::with_io(
            1,
            Box::new(io::sink()),
            None,
            Arc::new(RecordingLine::default()),
        )
        .unwrap();
        let dev = port.device();
        write_reg(&dev, 3, 0x80);
        read_reg(&dev, DATA)
    }

    #[test]
    fn ring_keeps_only_the_last_4k_in_order() {
        let mut ring = OutputRing::new();
        let data: Vec<u8> = (0..OUTPUT_RING_SIZE + 10)
            .map(|i| (i % 251) as u8)
            .collect();
        ring.record(&data[..100]);
        ring.record(&data[100..]);
        assert_eq!(ring.contents(), &data[10..]);
    }

    #[test]
    fn transmit_interrupt_pulses_the_line() {
        let line = Arc::new(RecordingLine::default());
        let port = SerialPort::with_io(1, Box::new(io::sink()), None, line.clone()).unwrap();
        let dev = port.device();
        write_reg(&dev, IER, 0x02); // THR empty interrupt
        assert_eq!(*line.levels.lock().unwrap(), vec![true, false]);
    }

    #[test]
    fn input_larger_than_the_fifo_arrives_complete_and_in_order() {
        let input: Vec<u8> = (0..1000u32).map(|i| (i % 256) as u8).collect();
        let line = Arc::new(RecordingLine::default());
        let port = SerialPort::with_io(
            1,
            Box::new(io::sink()),
            Some(Box::new(io::Cursor::new(input.clone()))),
            line,
        )
        .unwrap();
        let dev = port.device();
        assert_eq!(receive(&dev, input.len()), input);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !port.input_finished() {
            assert!(
                Instant::now() < deadline,
                "input thread did not stop at EOF"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn received_data_raises_the_interrupt_when_enabled() {
        let line = Arc::new(RecordingLine::default());
        let port = SerialPort::with_io(1, Box::new(io::sink()), None, line.clone()).unwrap();
        let dev = port.device();
        write_reg(&dev, IER, 0x01); // received-data interrupt
        line.levels.lock().unwrap().clear();
        lock(&dev).uart.enqueue_raw_bytes(b"x").unwrap();
        assert_eq!(*line.levels.lock().unwrap(), vec![true, false]);
        assert_eq!(read_reg(&dev, 2) & 0x0F, 0x04); // IIR: received data available
        assert_eq!(read_reg(&dev, DATA), b'x');
    }

    #[test]
    fn bad_com_number_is_refused() {
        let line = Arc::new(RecordingLine::default());
        let err = SerialPort::open(&SerialConfig::new(SerialBackend::Stdio), 3, line)
            .err()
            .unwrap();
        assert_eq!(err.to_string(), "invalid COM port 3: must be 1 or 2");
    }

    /// The whole path: a client on a real pty talks to the guest's UART registers.
    #[test]
    fn autopty_bytes_flow_both_ways_through_the_uart() {
        let line = Arc::new(RecordingLine::default());
        let port =
            SerialPort::open(&SerialConfig::new(SerialBackend::Autopty(None)), 2, line).unwrap();
        let path = std::ffi::CString::new(port.pty_path().unwrap().to_str().unwrap()).unwrap();
        // SAFETY: `path` is a valid C string; the result is checked.
        let raw = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
        assert!(raw >= 0, "cannot open the pty slave");
        // SAFETY: `raw` is a fresh descriptor owned by nobody else.
        let client = unsafe { OwnedFd::from_raw_fd(raw) };
        let dev = port.device();

        for &b in b"out\n" {
            write_reg(&dev, DATA, b);
        }
        let mut got = [0u8; 4];
        let mut filled = 0;
        while filled < got.len() {
            // SAFETY: the destination range lies inside `got`.
            let n = unsafe {
                libc::read(
                    client.as_raw_fd(),
                    got[filled..].as_mut_ptr().cast(),
                    got.len() - filled,
                )
            };
            assert!(n > 0, "pty read failed");
            filled += n as usize;
        }
        assert_eq!(&got, b"out\n");

        let msg = b"in\r\x03";
        // SAFETY: `msg` is valid for reads of its length.
        let n = unsafe { libc::write(client.as_raw_fd(), msg.as_ptr().cast(), msg.len()) };
        assert_eq!(n, msg.len() as isize);
        assert_eq!(receive(&dev, msg.len()), msg);
    }
}
