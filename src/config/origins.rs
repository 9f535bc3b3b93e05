//! `CORS_ALLOWED_ORIGINS`: which browser origins may call the API, parsed and normalised
//! at start. The headers they earn are [`crate::http::cors`]'s business.

/// The origins `CORS_ALLOWED_ORIGINS` allows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedOrigins {
    /// `*`: any origin of the form `scheme://host[:port]` (never the opaque `null`).
    pub(crate) any: bool,
    /// Serialised as browsers send them: lower case, no default port, no trailing slash.
    pub(crate) origins: Vec<String>,
}

impl AllowedOrigins {
    /// No CORS at all: the default.
    pub fn none() -> Self {
        Self::default()
    }

    /// Parses the comma-separated setting; empty entries are skipped. The error is the
    /// problem with the first entry that is neither `*` nor an origin.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let mut allowed = Self::none();
        for entry in raw.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            if entry == "*" {
                allowed.any = true;
            } else {
                let origin = normalise(entry).ok_or_else(|| {
                    format!(
                        "{entry:?} is not an origin (scheme://host[:port], without a path), nor *"
                    )
                })?;
                if !allowed.origins.contains(&origin) {
                    allowed.origins.push(origin);
                }
            }
        }
        Ok(allowed)
    }

    /// Whether CORS is on at all.
    pub fn is_enabled(&self) -> bool {
        self.any || !self.origins.is_empty()
    }
}

/// `scheme://host[:port]` as a browser serialises it (lower case, default port dropped),
/// or `None` when `raw` is not one.
pub(crate) fn normalise(raw: &str) -> Option<String> {
    let (scheme, rest) = raw.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    if scheme.is_empty()
        || !scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        || !scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    {
        return None;
    }
    // A bracketed IPv6 literal keeps its colons; the port follows the closing bracket.
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (inner, after) = v6.split_once(']')?;
        if inner.is_empty() || !inner.chars().all(|c| c.is_ascii_hexdigit() || c == ':') {
            return None;
        }
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?),
        };
        (format!("[{}]", inner.to_ascii_lowercase()), port)
    } else {
        let (host, port) = match rest.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        };
        let valid = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
        if !valid {
            return None;
        }
        (host.to_ascii_lowercase(), port)
    };
    let port = match port {
        None => None,
        Some(p) if !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) => {
            Some(p.parse::<u16>().ok()?)
        }
        Some(_) => return None,
    };
    let default_port = match scheme.as_str() {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    };
    Some(match port {
        Some(p) if Some(p) != default_port => format!("{scheme}://{host}:{p}"),
        _ => format!("{scheme}://{host}"),
    })
}
