//! Sizes for people, one format everywhere a user reads one (logs, events, `ls`, CSI errors):
//! binary units with one decimal, `512 B`, `64.0 MiB`, `4.5 GiB`.

use std::fmt;

/// A byte count that displays for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
        if self.0 < 1024 {
            return write!(f, "{} B", self.0);
        }
        let mut value = self.0 as f64;
        let mut unit = 0;
        while value >= 1024.0 && unit + 1 < UNITS.len() {
            value /= 1024.0;
            unit += 1;
        }
        write!(f, "{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_units_one_decimal() {
        let s = |n: u64| Size(n).to_string();
        assert_eq!(s(0), "0 B");
        assert_eq!(s(1023), "1023 B");
        assert_eq!(s(1536), "1.5 KiB");
        assert_eq!(s(64 << 20), "64.0 MiB");
        assert_eq!(s(4_800_000_000), "4.5 GiB");
        assert_eq!(s(3 << 40), "3.0 TiB");
    }
}
