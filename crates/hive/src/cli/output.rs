//! Printing objects as a table, JSON or YAML.

use anyhow::Result;
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

impl Output {
    /// Prints `items` as rows under `headers`, or as a JSON/YAML list.
    pub fn list<T: Serialize>(
        &self,
        items: &[T],
        headers: &[&str],
        row: impl Fn(&T) -> Vec<String>,
    ) -> Result<()> {
        match self {
            Output::Table => {
                print!("{}", table(headers, items.iter().map(row).collect()));
                Ok(())
            }
            Output::Json => {
                println!("{}", serde_json::to_string_pretty(items)?);
                Ok(())
            }
            Output::Yaml => {
                print!("{}", yaml_serde::to_string(items)?);
                Ok(())
            }
        }
    }

    /// Prints one object: a one-row table, or the whole object as JSON/YAML.
    pub fn object<T: Serialize>(
        &self,
        obj: &T,
        headers: &[&str],
        row: impl Fn(&T) -> Vec<String>,
    ) -> Result<()> {
        match self {
            Output::Table => {
                print!("{}", table(headers, vec![row(obj)]));
                Ok(())
            }
            Output::Json => {
                println!("{}", serde_json::to_string_pretty(obj)?);
                Ok(())
            }
            Output::Yaml => {
                print!("{}", yaml_serde::to_string(obj)?);
                Ok(())
            }
        }
    }
}

/// Left-aligned columns separated by three spaces.
pub fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (i, cell) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        for (i, c) in cells.iter().enumerate() {
            out.push_str(c);
            if i < last {
                out.push_str(&" ".repeat(widths[i] - c.chars().count() + 3));
            }
        }
        out.push('\n');
    };
    line(headers.to_vec());
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}

/// A duration since `t`, the way `ps` shows ages: 45s, 12m, 3h, 9d.
pub fn age(t: Option<chrono::DateTime<chrono::Utc>>) -> String {
    let Some(t) = t else { return "-".into() };
    let s = (chrono::Utc::now() - t).num_seconds().max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// `1.5 GiB`-style sizes for tables.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    match u {
        0 => format!("{n} B"),
        _ => format!("{v:.1} {}", UNITS[u]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align() {
        let t = table(
            &["NAME", "X"],
            vec![
                vec!["a".into(), "1".into()],
                vec!["long-name".into(), "22".into()],
            ],
        );
        assert_eq!(t, "NAME        X\na           1\nlong-name   22\n");
    }

    #[test]
    fn sizes_read_like_people_write_them() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(10 << 30), "10.0 GiB");
    }
}
