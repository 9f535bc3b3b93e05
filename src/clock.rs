//! Wall-clock time as the queue records it (Unix milliseconds), and ages as operators write
//! them (`30s`, `15m`, `12h`, `7d`).

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// An age as an operator writes it, in milliseconds: a bare number of seconds, or a
/// duration `humantime` reads (`30s`, `15m`, `12h`, `7d`, `1h 30m`).
pub fn parse_age_ms(raw: &str) -> Result<u64, String> {
    let raw = raw.trim();
    let age = match raw.parse::<u64>() {
        Ok(secs) => std::time::Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(raw)
            .map_err(|e| format!("{raw:?} is not a duration like 30s, 15m, 12h or 7d ({e})"))?,
    };
    Ok(u64::try_from(age.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages() {
        assert_eq!(parse_age_ms("90"), Ok(90_000));
        assert_eq!(parse_age_ms("15m"), Ok(900_000));
        assert_eq!(parse_age_ms("7d"), Ok(604_800_000));
        assert_eq!(parse_age_ms("1h 30m"), Ok(5_400_000));
        assert!(parse_age_ms("soon").is_err());
        assert!(parse_age_ms("5 fortnights").is_err());
    }
}
