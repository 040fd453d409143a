//! CPU and memory quantities as people type them: `500m`, `2`, `0.5`; `256Mi`, `1G`, `1000`.

/// CPU in millicores: `500m` → 500, `2` → 2000, `0.25` → 250.
pub fn cpu_millis(s: &str) -> Result<u64, String> {
    let bad =
        || format!("CPU quantity {s:?}: expected millicores like 500m or cores like 0.5 or 2");
    if let Some(m) = s.strip_suffix('m') {
        return m.parse::<u64>().map_err(|_| bad());
    }
    let cores: f64 = s.parse().map_err(|_| bad())?;
    if !cores.is_finite() || cores <= 0.0 || cores > 1_000_000.0 {
        return Err(bad());
    }
    Ok((cores * 1000.0).round() as u64)
}

/// Memory in bytes: plain bytes, or with a suffix K/M/G/T (powers of 1000) or Ki/Mi/Gi/Ti
/// (powers of 1024).
pub fn bytes(s: &str) -> Result<u64, String> {
    let bad = || format!("memory quantity {s:?}: expected bytes like 268435456, 256Mi or 1G");
    let units: [(&str, u64); 8] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("K", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    for (suffix, mult) in units {
        if let Some(n) = s.strip_suffix(suffix) {
            let n: u64 = n.parse().map_err(|_| bad())?;
            return n.checked_mul(mult).ok_or_else(bad);
        }
    }
    s.parse().map_err(|_| bad())
}

/// Bits per second: plain, or with a suffix k/K, M, G, T (powers of 1000), optionally
/// followed by `bit` (`100M`, `1Gbit`).
pub fn bits_per_sec(s: &str) -> Result<u64, String> {
    let bad = || format!("bandwidth {s:?}: expected bits/s like 500000, 100M or 1Gbit");
    let t = s.strip_suffix("bit").unwrap_or(s);
    let units: [(&str, u64); 5] = [
        ("k", 1_000),
        ("K", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    for (suffix, mult) in units {
        if let Some(n) = t.strip_suffix(suffix) {
            let n: u64 = n.parse().map_err(|_| bad())?;
            return n.checked_mul(mult).ok_or_else(bad);
        }
    }
    t.parse().map_err(|_| bad())
}

/// `GUARANTEED[:MAX]` bandwidth, each in [`bits_per_sec`].
pub fn bandwidth(s: &str) -> Result<(u64, Option<u64>), String> {
    match s.split_once(':') {
        Some((g, m)) => Ok((bits_per_sec(g)?, Some(bits_per_sec(m)?))),
        None => Ok((bits_per_sec(s)?, None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidth_parses_units_and_refuses_junk() {
        assert_eq!(bits_per_sec("100M"), Ok(100_000_000));
        assert_eq!(bits_per_sec("1Gbit"), Ok(1_000_000_000));
        assert_eq!(bits_per_sec("500k"), Ok(500_000));
        assert_eq!(bits_per_sec("42"), Ok(42));
        assert_eq!(bandwidth("100M:1G"), Ok((100_000_000, Some(1_000_000_000))));
        for bad in ["", "M", "1.5G", "-1M", "1Q", "99999999999T"] {
            assert!(bits_per_sec(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cpu() {
        assert_eq!(cpu_millis("500m"), Ok(500));
        assert_eq!(cpu_millis("2"), Ok(2000));
        assert_eq!(cpu_millis("0.25"), Ok(250));
        assert!(cpu_millis("x").is_err());
        assert!(cpu_millis("-1").is_err());
        assert!(cpu_millis("NaN").is_err());
    }

    #[test]
    fn memory() {
        assert_eq!(bytes("256Mi"), Ok(256 << 20));
        assert_eq!(bytes("1G"), Ok(1_000_000_000));
        assert_eq!(bytes("4096"), Ok(4096));
        assert!(bytes("1Xi").is_err());
        assert!(bytes("99999999999Ti").is_err());
    }
}
