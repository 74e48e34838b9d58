//! Sizes on the command line (`512M`, `10G`, `1TiB`, bytes) and in tables (`1.0 GiB`).

/// Why a `--size` argument was refused (before any request is sent).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("a size is needed: bytes or a number with a binary unit, e.g. 512M, 10G, 1T")]
    Empty,
    #[error("{0:?}: a size cannot be negative")]
    Negative(String),
    #[error("{0:?}: a size must be more than 0")]
    Zero(String),
    #[error(
        "{0:?} is not a size: give bytes or a number with a binary unit, e.g. 512M, 10G, 1T \
         (or 512MiB, 10GiB, 1TiB)"
    )]
    Invalid(String),
    #[error("{input:?} is ambiguous: sizes are binary, write {number}{unit} or {number}{unit}iB")]
    DecimalUnit {
        input: String,
        number: String,
        unit: char,
    },
    #[error("{0:?} is not a whole number of bytes")]
    Fraction(String),
    #[error("{0:?} is too large")]
    TooLarge(String),
}

const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];

/// Parse a size in bytes: a plain number of bytes, or a number (decimals allowed: `1.5G`) with a
/// binary unit `K`, `M`, `G`, `T` (also `KiB` ... `TiB`, any case). Refuses 0, negatives,
/// garbage and `GB`-style units (decimal or binary? we do not guess).
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(SizeError::Empty);
    }
    if s.starts_with('-') {
        return Err(SizeError::Negative(input.into()));
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = (&s[..split], s[split..].trim());
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        "kb" | "mb" | "gb" | "tb" if !number.is_empty() => {
            return Err(SizeError::DecimalUnit {
                input: input.into(),
                number: number.into(),
                unit: unit.chars().next().unwrap_or('G').to_ascii_uppercase(),
            })
        }
        _ => return Err(SizeError::Invalid(input.into())),
    };
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    let all_digits = |p: &str| p.chars().all(|c| c.is_ascii_digit());
    if (int.is_empty() && frac.is_empty()) || !all_digits(int) || !all_digits(frac) {
        return Err(SizeError::Invalid(input.into()));
    }
    let too_large = || SizeError::TooLarge(input.into());
    // Exact arithmetic: mantissa × 2^shift / 10^decimals must be a whole number of bytes.
    let digits = format!("{int}{frac}");
    let mantissa: u128 = digits.parse().map_err(|_| too_large())?;
    let scale = 10u128
        .checked_pow(u32::try_from(frac.len()).map_err(|_| too_large())?)
        .ok_or_else(too_large)?;
    let scaled = mantissa.checked_shl(shift).ok_or_else(too_large)?;
    if scaled >> shift != mantissa {
        return Err(too_large());
    }
    if scaled % scale != 0 {
        return Err(SizeError::Fraction(input.into()));
    }
    let bytes = u64::try_from(scaled / scale).map_err(|_| too_large())?;
    if bytes == 0 {
        return Err(SizeError::Zero(input.into()));
    }
    Ok(bytes)
}

/// `1536` → `1.5 KiB`, `1073741824` → `1.0 GiB`; below 1 KiB in bytes (`512 B`).
pub fn human_size(bytes: u64) -> String {
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    // 1023.96 MiB would print as "1024.0 MiB": say 1.0 GiB instead.
    if (v * 10.0).round() >= 10240.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// `10737418240 bytes (10.0 GiB)`.
pub fn bytes_and_human(bytes: u64) -> String {
    format!("{bytes} bytes ({})", human_size(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn sizes_parse_bytes_and_binary_units() {
        for (input, want) in [
            ("1", 1),
            ("4096", 4096),
            ("4096B", 4096),
            ("1K", 1024),
            ("512M", 512 << 20),
            ("512MiB", 512 << 20),
            ("512mib", 512 << 20),
            ("10G", 10 * GIB),
            ("10g", 10 * GIB),
            ("10GiB", 10 * GIB),
            (" 10 G ", 10 * GIB),
            ("1T", 1 << 40),
            ("1TiB", 1 << 40),
            ("1.5G", 3 * GIB / 2),
            ("0.5K", 512),
            (".5M", 512 << 10),
            ("16777215T", 16777215 << 40),
        ] {
            assert_eq!(parse_size(input), Ok(want), "{input}");
        }
    }

    #[test]
    fn bad_sizes_are_refused_with_a_reason() {
        assert_eq!(parse_size("0"), Err(SizeError::Zero("0".into())));
        assert_eq!(parse_size("0G"), Err(SizeError::Zero("0G".into())));
        assert_eq!(parse_size("0.0M"), Err(SizeError::Zero("0.0M".into())));
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        assert_eq!(parse_size("  "), Err(SizeError::Empty));
        assert_eq!(parse_size("-1"), Err(SizeError::Negative("-1".into())));
        assert_eq!(parse_size("-5G"), Err(SizeError::Negative("-5G".into())));
        for garbage in [
            "G", "abc", "10X", "10 GiBs", "1.2.3G", "1e9", "0x10", "10 G B", ".", "+5G", "5-G",
        ] {
            assert_eq!(
                parse_size(garbage),
                Err(SizeError::Invalid(garbage.into())),
                "{garbage}"
            );
        }
        assert!(matches!(
            parse_size("10GB"),
            Err(SizeError::DecimalUnit { unit: 'G', .. })
        ));
        assert_eq!(parse_size("1.5"), Err(SizeError::Fraction("1.5".into())));
        assert_eq!(parse_size("0.3K"), Err(SizeError::Fraction("0.3K".into())));
        assert_eq!(
            parse_size("16777216T"),
            Err(SizeError::TooLarge("16777216T".into()))
        );
        assert!(matches!(
            parse_size("99999999999999999999999999999999999999999999"),
            Err(SizeError::TooLarge(_))
        ));
    }

    #[test]
    fn messages_say_what_to_write() {
        let m = parse_size("10GB")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(m.contains("10G or 10GiB"), "{m}");
        let m = parse_size("lots")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(m.contains("\"lots\"") && m.contains("512M"), "{m}");
    }

    #[test]
    fn human_sizes_use_one_decimal_and_binary_units() {
        for (bytes, want) in [
            (0, "0 B"),
            (512, "512 B"),
            (1023, "1023 B"),
            (1024, "1.0 KiB"),
            (1536, "1.5 KiB"),
            (512 << 20, "512.0 MiB"),
            (GIB, "1.0 GiB"),
            (10 * GIB + 3 * GIB / 10, "10.3 GiB"),
            (GIB - 1, "1.0 GiB"),
            ((1 << 20) - 1, "1.0 MiB"),
            (1 << 40, "1.0 TiB"),
            (u64::MAX, "16.0 EiB"),
        ] {
            assert_eq!(human_size(bytes), want, "{bytes}");
        }
        assert_eq!(bytes_and_human(GIB), "1073741824 bytes (1.0 GiB)");
    }

    #[test]
    fn parsed_sizes_format_back() {
        for s in ["512M", "10G", "1T", "1.5G"] {
            let b = parse_size(s).unwrap_or(0);
            let h = human_size(b);
            assert_eq!(
                parse_size(&h.replace(' ', "").replace(".0", "")),
                Ok(b),
                "{s} -> {h}"
            );
        }
    }
}
