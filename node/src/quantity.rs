//! Kubernetes resource quantities (`128Mi`, `250m`, `1.5e3`), read exactly as the API server
//! reads them, and turned into the kubelet's units as the kubelet rounds them.
//!
//! Start at [`Quantity::parse`]. It follows `k8s.io/apimachinery/pkg/api/resource`
//! (`ParseQuantity`) character for character: an optional sign, digits with an optional
//! fraction (`1.`, `.5` and even a bare sign or `.` are numbers), then a suffix: decimal SI
//! (`n u m "" k M G T P E`), binary SI (`Ki Mi Gi Ti Pi Ei`) or a decimal exponent (`e3`,
//! `E-3`, `e+6`). The value is kept exactly, never as a float, in nano-units, rounded up (away
//! from zero) to the nano as the API server rounds it; a binary-SI value is capped at 2^63-1
//! as the API server caps it. Then, as the kubelet reads a quantity:
//! - [`Quantity::bytes`] (memory, storage, counts) is `Value()`: rounded up to a whole unit, so
//!   `67108864001m` is 67108865 bytes;
//! - [`Quantity::millis`] (CPU) is `MilliValue()`: rounded up to a whole thousandth.
//!
//! Both refuse a negative quantity (no resource is negative) and saturate at `u64::MAX` where
//! Go's int64 would overflow. Known departures from Go, all beyond 9.2e18 units: Go wraps
//! around there; we saturate. There is no formatting here: the node writes quantities with
//! [`crate::eviction::thresholds::binary_quantity`] and plain integers.
//!
//! The one place the codebase reads a quantity; replaces four hand-rolled float parsers.

use std::fmt;
use std::str::FromStr;

/// Nano-units in one unit.
const NANO: i128 = 1_000_000_000;
/// The API server caps a binary-SI quantity at the largest int64 (`maxAllowed`).
const BINARY_CAP_NANOS: i128 = (i64::MAX as i128) * NANO;

/// A quantity that is not one, with the text and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    /// Not of the quantity form (Go's `ErrFormatWrong`).
    #[error("{0:?} is not a quantity (want a number and a suffix, e.g. 128Mi, 250m, 1.5G, 1e3)")]
    Format(String),
    /// The number part has no digit where one is needed (Go's `ErrNumeric`).
    #[error("{0:?} is not a quantity: its number has no digits")]
    Numeric(String),
    /// An unknown suffix (Go's `ErrSuffix`).
    #[error("{0:?} has an unknown suffix (n, u, m, k, M, G, T, P, E, Ki, Mi, Gi, Ti, Pi, Ei, or an exponent e<n>)")]
    Suffix(String),
    /// A negative quantity where a resource amount is wanted.
    #[error("{0:?} is negative; a resource quantity must not be")]
    Negative(String),
}

/// How the quantity was written (as the API server remembers it for printing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    DecimalSI,
    BinarySI,
    DecimalExponent,
}

/// An exact quantity: its value in nano-units (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quantity {
    nanos: i128,
    format: Format,
    text: String,
}

impl Quantity {
    /// Reads `s` as the API server does (see the module docs).
    pub fn parse(s: &str) -> Result<Quantity, QuantityError> {
        if s.is_empty() {
            return Err(QuantityError::Format(s.into()));
        }
        if s == "0" {
            return Ok(Quantity {
                nanos: 0,
                format: Format::DecimalSI,
                text: s.into(),
            });
        }
        let parts = scan(s).ok_or_else(|| QuantityError::Format(s.into()))?;
        let (base2, exponent, format) =
            interpret(parts.suffix).ok_or_else(|| QuantityError::Suffix(s.into()))?;
        // Go takes a fast path (int64 arithmetic) or, past its precision, a slow one (inf.Dec)
        // that re-reads the number part and so needs a digit in it: "Pi" alone is an error,
        // "Mi" alone is zero. Same value either way otherwise.
        let denom_len = parts.denom.len() as i64;
        let precision = if base2 {
            if denom_len == 0 {
                15 - parts.num.len() as i64 - i64::from(exponent) * 3 / 10 - 1
            } else {
                -1
            }
        } else {
            18 - (parts.num.len() as i64 + denom_len)
        };
        let scale = if base2 {
            -denom_len
        } else {
            i64::from(exponent) - denom_len
        };
        let fast = precision >= 0 && scale >= -9;
        if !fast && !parts.number.bytes().any(|b| b.is_ascii_digit()) {
            return Err(QuantityError::Numeric(s.into()));
        }
        let digits: Vec<u8> = parts
            .num
            .bytes()
            .chain(parts.denom.bytes())
            .map(|b| b - b'0')
            .collect();
        let magnitude = if base2 {
            nanos_of(digits, exponent as u32, -denom_len)
        } else {
            nanos_of(digits, 0, scale)
        };
        let magnitude = if format == Format::BinarySI {
            magnitude.min(BINARY_CAP_NANOS)
        } else {
            magnitude
        };
        // Go: a binary quantity between 0 and 1 is printed as decimal ("avoids rounding").
        let format = if format == Format::BinarySI && magnitude > 0 && magnitude < NANO {
            Format::DecimalSI
        } else {
            format
        };
        let nanos = if parts.positive {
            magnitude
        } else {
            -magnitude
        };
        Ok(Quantity {
            nanos,
            format,
            text: s.into(),
        })
    }

    /// The exact value in nano-units (10^-9), as the API server holds it.
    pub fn nanos(&self) -> i128 {
        self.nanos
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// Go's `Value()`: the value rounded up to a whole unit.
    pub fn value(&self) -> i128 {
        ceil_div(self.nanos, NANO)
    }

    /// Go's `MilliValue()`: the value in thousandths, rounded up.
    pub fn milli_value(&self) -> i128 {
        ceil_div(self.nanos, NANO / 1000)
    }

    /// Whole units (bytes of memory or storage, a count), rounded up as the kubelet's
    /// `Value()`; refuses a negative quantity.
    pub fn bytes(&self) -> Result<u64, QuantityError> {
        self.non_negative(self.value())
    }

    /// Thousandths (millicores of CPU), rounded up as the kubelet's `MilliValue()`; refuses a
    /// negative quantity.
    pub fn millis(&self) -> Result<u64, QuantityError> {
        self.non_negative(self.milli_value())
    }

    fn non_negative(&self, v: i128) -> Result<u64, QuantityError> {
        if self.nanos < 0 {
            return Err(QuantityError::Negative(self.text.clone()));
        }
        Ok(u64::try_from(v).unwrap_or(u64::MAX))
    }
}

impl FromStr for Quantity {
    type Err = QuantityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Quantity::parse(s)
    }
}

impl fmt::Display for Quantity {
    /// As written (the API server sends the canonical form already).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Memory, storage or a count in whole units: `128Mi`, `1G`, `67108864001m` (67108865).
pub fn bytes(s: &str) -> Result<u64, QuantityError> {
    Quantity::parse(s)?.bytes()
}

/// CPU in millicores: `200m` is 200, `0.5` is 500, `2` is 2000, `0.0001` is 1.
pub fn milli_cpu(s: &str) -> Result<u64, QuantityError> {
    Quantity::parse(s)?.millis()
}

/// A number and its suffix, as Go's `parseQuantityString` splits them.
struct Parts<'a> {
    positive: bool,
    /// The number as written, sign included (what Go's slow path re-reads).
    number: &'a str,
    /// Integer digits without leading zeros ("0" when none are left).
    num: &'a str,
    denom: &'a str,
    suffix: &'a str,
}

/// Go's `parseQuantityString`, step for step; `None` is `ErrFormatWrong`.
fn scan(s: &str) -> Option<Parts<'_>> {
    let b = s.as_bytes();
    let end = b.len();
    let mut pos = 0;
    let mut positive = true;
    match b.first() {
        Some(b'-') => {
            positive = false;
            pos = 1;
        }
        Some(b'+') => pos = 1,
        _ => {}
    }
    while pos < end && b[pos] == b'0' {
        pos += 1;
    }
    if pos >= end {
        return Some(Parts {
            positive,
            number: "0",
            num: "0",
            denom: "",
            suffix: "",
        });
    }
    let num_start = pos;
    while pos < end && b[pos].is_ascii_digit() {
        pos += 1;
    }
    let num = if pos == num_start {
        "0"
    } else {
        &s[num_start..pos]
    };
    let mut denom = "";
    if pos < end && b[pos] == b'.' {
        pos += 1;
        let start = pos;
        while pos < end && b[pos].is_ascii_digit() {
            pos += 1;
        }
        denom = &s[start..pos];
    }
    let number = &s[..pos];
    let suffix_start = pos;
    while pos < end && b"eEinumkKMGTP".contains(&b[pos]) {
        pos += 1;
    }
    if pos < end && (b[pos] == b'-' || b[pos] == b'+') {
        pos += 1;
    }
    while pos < end && b[pos].is_ascii_digit() {
        pos += 1;
    }
    (pos == end).then(|| Parts {
        positive,
        number,
        num,
        denom,
        suffix: &s[suffix_start..],
    })
}

/// (base 2?, exponent, format) of a suffix, as Go's suffixer interprets it.
fn interpret(suffix: &str) -> Option<(bool, i32, Format)> {
    let decimal = |e| Some((false, e, Format::DecimalSI));
    let binary = |e| Some((true, e, Format::BinarySI));
    match suffix {
        "" => decimal(0),
        "n" => decimal(-9),
        "u" => decimal(-6),
        "m" => decimal(-3),
        "k" => decimal(3),
        "M" => decimal(6),
        "G" => decimal(9),
        "T" => decimal(12),
        "P" => decimal(15),
        "E" => decimal(18),
        "Ki" => binary(10),
        "Mi" => binary(20),
        "Gi" => binary(30),
        "Ti" => binary(40),
        "Pi" => binary(50),
        "Ei" => binary(60),
        s if s.len() > 1 && (s.starts_with('e') || s.starts_with('E')) => {
            // strconv.ParseInt(s[1:], 10, 64), then int32(...) as Go truncates it.
            let exponent: i64 = s[1..].parse().ok()?;
            Some((false, exponent as i32, Format::DecimalExponent))
        }
        _ => None,
    }
}

/// |digits × 2^shift × 10^scale| in nano-units, rounded up to a whole nano, saturating at
/// `i128::MAX` (about 1.7e29 units, past every int64 the API server can hold).
fn nanos_of(mut digits: Vec<u8>, shift: u32, scale: i64) -> i128 {
    if shift > 0 {
        // Decimal digits times 2^shift (shift <= 60), carrying in u128.
        let mut carry: u128 = 0;
        for d in digits.iter_mut().rev() {
            let v = u128::from(*d) * (1u128 << shift) + carry;
            *d = (v % 10) as u8;
            carry = v / 10;
        }
        let mut high = Vec::new();
        while carry > 0 {
            high.push((carry % 10) as u8);
            carry /= 10;
        }
        high.reverse();
        high.extend(digits);
        digits = high;
    }
    let first = digits.iter().position(|d| *d != 0);
    let Some(first) = first else { return 0 };
    let digits = &digits[first..];
    let k = scale.saturating_add(9);
    let (whole, round_up) = if k >= 0 {
        (digits, false)
    } else {
        let cut = digits
            .len()
            .saturating_sub(usize::try_from(-k).unwrap_or(usize::MAX));
        (&digits[..cut], digits[cut..].iter().any(|d| *d != 0))
    };
    let mut value: i128 = 0;
    for d in whole {
        value = match value
            .checked_mul(10)
            .and_then(|v| v.checked_add(i128::from(*d)))
        {
            Some(v) => v,
            None => return i128::MAX,
        };
    }
    if k > 0 {
        for _ in 0..k {
            value = match value.checked_mul(10) {
                Some(v) => v,
                None => return i128::MAX,
            };
        }
    }
    if round_up {
        value = value.saturating_add(1);
    }
    value
}

/// `n / d` rounded toward +infinity (`d` > 0).
fn ceil_div(n: i128, d: i128) -> i128 {
    let q = n.div_euclid(d);
    if n.rem_euclid(d) == 0 {
        q
    } else {
        q + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// `m × 10^e` in nanos: Go's test helper `decQuantity(m, e, format)`.
    fn dec(m: i128, e: i32) -> i128 {
        let k = e + 9;
        assert!(k >= 0);
        m * 10i128.pow(k as u32)
    }

    /// The table of k8s.io/apimachinery/pkg/api/resource quantity_test.go `TestQuantityParse`
    /// (v0.34), each input with the value and format the API server gives it.
    #[test]
    fn the_api_servers_own_examples() {
        let max = BINARY_CAP_NANOS;
        let (d, b, x) = (Format::DecimalSI, Format::BinarySI, Format::DecimalExponent);
        let table: &[(&str, i128, Format)] = &[
            ("0", 0, d),
            ("0n", 0, d),
            ("0u", 0, d),
            ("0m", 0, d),
            ("0Ki", 0, b),
            ("0k", 0, d),
            ("0Mi", 0, b),
            ("0M", 0, d),
            ("0Gi", 0, b),
            ("0G", 0, d),
            ("0Ti", 0, b),
            ("0T", 0, d),
            ("1", dec(1, 0), d),
            ("1Ki", dec(1024, 0), b),
            ("8Ki", dec(8 * 1024, 0), b),
            ("7Mi", dec(7 << 20, 0), b),
            ("6Gi", dec(6 << 30, 0), b),
            ("5Ti", dec(5 << 40, 0), b),
            ("4Pi", dec(4 << 50, 0), b),
            ("3Ei", dec(3 << 60, 0), b),
            ("10Ti", dec(10 << 40, 0), b),
            ("100Ti", dec(100 << 40, 0), b),
            ("5n", dec(5, -9), d),
            ("4u", dec(4, -6), d),
            ("3m", dec(3, -3), d),
            ("9", dec(9, 0), d),
            ("8k", dec(8, 3), d),
            ("50k", dec(5, 4), d),
            ("7M", dec(7, 6), d),
            ("6G", dec(6, 9), d),
            ("5T", dec(5, 12), d),
            ("40T", dec(4, 13), d),
            ("300T", dec(3, 14), d),
            ("2P", dec(2, 15), d),
            ("1E", dec(1, 18), d),
            ("1E-3", dec(1, -3), x),
            ("1e3", dec(1, 3), x),
            ("1E6", dec(1, 6), x),
            ("1e9", dec(1, 9), x),
            ("1E12", dec(1, 12), x),
            ("1e15", dec(1, 15), x),
            ("1E18", dec(1, 18), x),
            ("1e14", dec(1, 14), x),
            ("1e13", dec(1, 13), x),
            ("1e3", dec(1, 3), x),
            ("100.035k", dec(100035, 0), d),
            ("0.001", dec(1, -3), d),
            ("0.0005k", dec(5, -1), d),
            ("0.005", dec(5, -3), d),
            ("0.05", dec(5, -2), d),
            ("0.5", dec(5, -1), d),
            ("0.00050k", dec(5, -1), d),
            ("0.00500", dec(5, -3), d),
            ("0.05000", dec(5, -2), d),
            ("0.50000", dec(5, -1), d),
            ("0.5e0", dec(5, -1), x),
            ("0.5e-1", dec(5, -2), x),
            ("0.5e-2", dec(5, -3), x),
            ("10.035M", dec(10035, 3), d),
            ("1.2e3", dec(12, 2), x),
            ("1.3E+6", dec(13, 5), x),
            ("1.40e9", dec(14, 8), x),
            ("1.53E12", dec(153, 10), x),
            ("1.6e15", dec(16, 14), x),
            ("1.7E18", dec(17, 17), x),
            ("9.01", dec(901, -2), d),
            ("8.1k", dec(81, 2), d),
            ("7.123456M", dec(7123456, 0), d),
            ("6.987654321G", dec(6987654321, 0), d),
            ("5.444T", dec(5444, 9), d),
            ("40.1T", dec(401, 11), d),
            ("300.2T", dec(3002, 11), d),
            ("2.5P", dec(25, 14), d),
            ("1.01E", dec(101, 16), d),
            // Things that saturate/round.
            ("3.001n", dec(4, -9), d),
            ("1.1E-9", dec(2, -9), x),
            ("0.0000000001", dec(1, -9), d),
            ("0.0000000005", dec(1, -9), d),
            ("0.00000000050", dec(1, -9), d),
            ("0.5e-9", dec(1, -9), x),
            ("0.9n", dec(1, -9), d),
            ("0.00000012345", dec(124, -9), d),
            ("0.00000012354", dec(124, -9), d),
            ("9Ei", max, b),
            ("9223372036854775807Ki", max, b),
            ("12E", dec(12, 18), d),
            // Fractional binary.
            ("100.035Ki", dec(10243584, -2), b),
            ("0.5Mi", dec(512 * 1024, 0), b),
            ("0.05Gi", dec(536870912, -1), b),
            ("0.025Ti", dec(274877906944, -1), b),
            // "Things written by trolls" (Go's words): rounds up, changes format.
            ("0.000000000001Ki", dec(2, -9), d),
            (".001", dec(1, -3), d),
            (".0001k", dec(100, -3), d),
            ("1.", dec(1, 0), d),
            ("1.G", dec(1, 9), d),
        ];
        for (input, nanos, format) in table {
            let q = Quantity::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!((q.nanos(), q.format()), (*nanos, *format), "{input}");
            // Go's test also reads each with a sign in front.
            assert_eq!(
                Quantity::parse(&format!("-{input}")).unwrap().nanos(),
                -nanos,
                "-{input}"
            );
            assert_eq!(
                Quantity::parse(&format!("+{input}")).unwrap().nanos(),
                *nanos,
                "+{input}"
            );
        }
        // TestParseQuantityString's odd ones, and the empty string.
        for (input, nanos) in [
            (".", 0),
            ("-.", 0),
            ("1E-3", dec(1, -3)),
            ("-1.025Ti", -dec(1025 << 40, -3)),
        ] {
            assert_eq!(Quantity::parse(input).unwrap().nanos(), nanos, "{input}");
        }
        let invalid = [
            "", "1.1.M", "1+1.0M", "0.1mi", "0.1am", "aoeu", ".5i", "1i", "-3.01i", "-3.01e-",
            " 1", "1 ",
        ];
        for input in invalid {
            assert!(Quantity::parse(input).is_err(), "{input:?} parsed");
        }
    }

    /// Go's `Value()` and `MilliValue()` rounding (TestQuantityRoundUp, the kubelet's reads).
    #[test]
    fn kubelet_units_round_up() {
        assert_eq!(bytes("67108864001m"), Ok(67_108_865));
        assert_eq!(bytes("64Mi"), Ok(64 << 20));
        assert_eq!(bytes("1500m"), Ok(2));
        assert_eq!(bytes("9.01"), Ok(10));
        assert_eq!(bytes("1e3"), Ok(1000));
        assert_eq!(bytes("1E3"), Ok(1000));
        assert_eq!(bytes("0.5Ki"), Ok(512));
        assert_eq!(bytes("9Ei"), Ok(i64::MAX as u64));
        assert_eq!(bytes("1e40"), Ok(u64::MAX), "saturates where Go would wrap");
        assert_eq!(milli_cpu("200m"), Ok(200));
        assert_eq!(milli_cpu("0.5"), Ok(500));
        assert_eq!(milli_cpu("2"), Ok(2000));
        assert_eq!(milli_cpu("0.0001"), Ok(1));
        assert_eq!(milli_cpu("1u"), Ok(1));
        assert_eq!(milli_cpu("100n"), Ok(1));
        assert!(matches!(bytes("-1Mi"), Err(QuantityError::Negative(_))));
        assert!(matches!(bytes("12 apples"), Err(QuantityError::Format(_))));
        assert!(matches!(bytes("12Xi"), Err(QuantityError::Format(_))));
        assert!(matches!(bytes("1K"), Err(QuantityError::Suffix(_))));
        // Go's fast and slow paths: no digits is zero on one and an error on the other.
        assert_eq!(bytes("Mi"), Ok(0));
        assert!(matches!(bytes("Pi"), Err(QuantityError::Numeric(_))));
        assert!(matches!(bytes(".e-20"), Err(QuantityError::Numeric(_))));
        assert_eq!(bytes("+"), Ok(0));
    }

    const SUFFIXES: &[(&str, u32, u32, i32)] = &[
        // (suffix, multiplier as 2^a × 10^b with a, b; or a negative decimal exponent)
        ("", 0, 0, 0),
        ("k", 0, 3, 0),
        ("M", 0, 6, 0),
        ("G", 0, 9, 0),
        ("T", 0, 12, 0),
        ("Ki", 10, 0, 0),
        ("Mi", 20, 0, 0),
        ("Gi", 30, 0, 0),
        ("m", 0, 0, -3),
        ("u", 0, 0, -6),
        ("n", 0, 0, -9),
    ];

    proptest! {
        /// An integer with any suffix is exactly integer × suffix (no float anywhere).
        #[test]
        fn integers_with_suffixes_are_exact(n in 0u64..1u64 << 40, i in 0..SUFFIXES.len()) {
            let (suffix, two, ten, neg) = SUFFIXES[i];
            let q = Quantity::parse(&format!("{n}{suffix}")).unwrap();
            let value = i128::from(n) * (1i128 << two) * 10i128.pow(ten);
            // Values past int64 saturate (see the module docs); this property is about the exact
            // range.
            prop_assume!(value <= i128::from(i64::MAX));
            let expect = value * 10i128.pow((9 + neg) as u32);
            prop_assert_eq!(q.nanos(), expect);
        }

        /// A decimal fraction is its exact value rounded up to the nano; bytes round up again.
        #[test]
        fn fractions_round_up_exactly(int in 0u64..1_000_000_000, frac in "[0-9]{1,15}") {
            let q = Quantity::parse(&format!("{int}.{frac}")).unwrap();
            let scale = frac.len() as u32;
            let exact_num = i128::from(int) * 10i128.pow(scale) + frac.parse::<i128>().unwrap();
            // nanos = ceil(exact_num × 10^9 / 10^scale)
            let expect = ceil_div(exact_num * NANO, 10i128.pow(scale));
            prop_assert_eq!(q.nanos(), expect);
            prop_assert_eq!(q.bytes().unwrap() as i128, ceil_div(expect, NANO));
        }

        /// Milli bytes round up to whole bytes: `Xm` is ceil(X / 1000).
        #[test]
        fn milli_bytes_round_up(x in 0u64..u64::MAX / 2) {
            prop_assert_eq!(bytes(&format!("{x}m")).unwrap(), x.div_ceil(1000));
        }

        /// An exponent is the same number with zeros: `NeK` is N followed by K zeros.
        #[test]
        fn exponents_are_zeros(n in 0u64..1_000_000, k in 0u32..12, upper in any::<bool>()) {
            let e = if upper { "E" } else { "e" };
            let q = Quantity::parse(&format!("{n}{e}{k}")).unwrap();
            prop_assert_eq!(q.nanos(), Quantity::parse(&format!("{n}{}", "0".repeat(k as usize))).unwrap().nanos());
            prop_assert_eq!(q.format(), Format::DecimalExponent);
        }

        /// A sign flips the value and nothing else.
        #[test]
        fn signs_are_symmetric(s in "[0-9]{0,20}(\\.[0-9]{0,12})?(|n|u|m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|e[+-]?[0-9]{1,2})") {
            if let Ok(q) = Quantity::parse(&s) {
                prop_assert_eq!(Quantity::parse(&format!("-{s}")).unwrap().nanos(), -q.nanos());
                prop_assert_eq!(Quantity::parse(&format!("+{s}")).unwrap().nanos(), q.nanos());
            }
        }

        /// Whatever the text, an answer and no panic.
        #[test]
        fn any_text_is_answered(s in "\\PC{0,40}") {
            let _ = Quantity::parse(&s);
        }
    }
}
