//! `-m SIZE`: xhyve's `parse_memsize` + FreeBSD's `expand_number`, decimal only.
//!
//! Accepted: `512` (a plain number below 1 MiB counts megabytes), `1073741824` (a plain number
//! of at least 1 MiB counts bytes), `2048K`, `1g`, `1G`, `1GB`, `1gb`, `1048576B` (suffixes
//! B/K/M/G/T/P/E, case-insensitive, binary; a B may follow a K..E suffix as in `1GB`).
//! Unlike xhyve's `strtoul(.., 0)`, hex and octal forms (`0x100`, `0400`) are not special:
//! `0x100` is rejected and `0400` is 400 MiB, which is what a user typing it means.

use super::CliError;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const PAGE_SIZE: u64 = 4 * KIB;

/// Parses a `-m` value into a byte count that is a non-zero multiple of 4 KiB and >= 1 MiB.
pub fn parse_memsize(value: &str) -> Result<u64, CliError> {
    let invalid = |reason| CliError::InvalidMemsize {
        value: value.to_string(),
        reason,
    };
    let digits_end = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (digits, suffix) = value.split_at(digits_end);
    if digits.is_empty() {
        return Err(invalid(
            "expected a number with an optional K, M, G, T, P or E suffix",
        ));
    }
    let number: u64 = digits.parse().map_err(|_| invalid("number too large"))?;

    let bytes = if suffix.is_empty() {
        if number < MIB {
            number.checked_mul(MIB).ok_or(invalid("number too large"))?
        } else {
            number
        }
    } else {
        let shift = suffix_shift(suffix)
            .ok_or(invalid("unknown suffix; use one of B, K, M, G, T, P or E"))?;
        number
            .checked_mul(1u64 << shift)
            .ok_or(invalid("number too large"))?
    };

    if bytes == 0 {
        return Err(invalid("memory size must not be zero"));
    }
    if bytes < MIB {
        return Err(invalid("memory size must be at least 1 MiB"));
    }
    if bytes % PAGE_SIZE != 0 {
        return Err(invalid("memory size must be a multiple of 4 KiB"));
    }
    Ok(bytes)
}

/// The power of two a unit suffix stands for: `B`, `K`, `KB`, ... `E`, `EB`.
fn suffix_shift(suffix: &str) -> Option<u32> {
    let lower = suffix.to_ascii_lowercase();
    let unit = match lower.as_str() {
        "b" => return Some(0),
        _ => lower.strip_suffix('b').unwrap_or(&lower),
    };
    match unit {
        "k" => Some(10),
        "m" => Some(20),
        "g" => Some(30),
        "t" => Some(40),
        "p" => Some(50),
        "e" => Some(60),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn reason(value: &str) -> &'static str {
        match parse_memsize(value) {
            Err(CliError::InvalidMemsize { value: v, reason }) => {
                assert_eq!(v, value);
                reason
            }
            other => panic!("-m {value}: expected InvalidMemsize, got {other:?}"),
        }
    }

    #[test]
    fn plain_numbers_below_one_mib_are_megabytes() {
        assert_eq!(parse_memsize("512").unwrap(), 512 * MIB);
        assert_eq!(parse_memsize("1").unwrap(), MIB);
        assert_eq!(parse_memsize("4097").unwrap(), 4097 * MIB);
        assert_eq!(parse_memsize("1048575").unwrap(), 1_048_575 * MIB);
    }

    #[test]
    fn plain_numbers_from_one_mib_are_bytes() {
        assert_eq!(parse_memsize("1048576").unwrap(), MIB);
        assert_eq!(parse_memsize("1073741824").unwrap(), GIB);
    }

    #[test]
    fn suffixes_are_binary_and_case_insensitive() {
        assert_eq!(parse_memsize("2048K").unwrap(), 2 * MIB);
        assert_eq!(parse_memsize("2048k").unwrap(), 2 * MIB);
        assert_eq!(parse_memsize("1G").unwrap(), GIB);
        assert_eq!(parse_memsize("1g").unwrap(), GIB);
        assert_eq!(parse_memsize("1GB").unwrap(), GIB);
        assert_eq!(parse_memsize("1gb").unwrap(), GIB);
        assert_eq!(parse_memsize("256M").unwrap(), 256 * MIB);
        assert_eq!(parse_memsize("1T").unwrap(), 1 << 40);
        assert_eq!(parse_memsize("1P").unwrap(), 1 << 50);
        assert_eq!(parse_memsize("1E").unwrap(), 1 << 60);
        assert_eq!(parse_memsize("1048576B").unwrap(), MIB);
    }

    #[test]
    fn rejects_zero_negative_fractions_and_unknown_suffixes() {
        assert_eq!(reason("0"), "memory size must not be zero");
        assert_eq!(reason("0G"), "memory size must not be zero");
        assert!(reason("-1").starts_with("expected a number"));
        assert!(reason("").starts_with("expected a number"));
        assert!(reason("G").starts_with("expected a number"));
        assert!(reason("1Q").starts_with("unknown suffix"));
        assert!(reason("1.5G").starts_with("unknown suffix"));
        assert!(reason("1GiB").starts_with("unknown suffix"));
        assert!(reason("1BB").starts_with("unknown suffix"));
        assert!(reason("0x100").starts_with("unknown suffix"));
        assert!(reason(" 1G").starts_with("expected a number"));
    }

    #[test]
    fn rejects_sizes_below_one_mib_or_not_page_multiples() {
        assert_eq!(reason("4097B"), "memory size must be at least 1 MiB");
        assert_eq!(reason("1023K"), "memory size must be at least 1 MiB");
        assert_eq!(reason("1048577"), "memory size must be a multiple of 4 KiB");
        assert_eq!(reason("1025K"), "memory size must be a multiple of 4 KiB");
    }

    #[test]
    fn rejects_overflow() {
        assert_eq!(reason("99999999999T"), "number too large");
        assert_eq!(reason("16E"), "number too large");
        assert_eq!(reason("99999999999999999999999"), "number too large");
    }

    #[test]
    fn error_message_names_the_value() {
        let err = parse_memsize("1Q").unwrap_err();
        assert!(err
            .to_string()
            .starts_with("invalid memsize '1Q': unknown suffix"));
        assert_eq!(err.exit_code(), 64);
    }
}
