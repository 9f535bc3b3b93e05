//! Trace export settings: the standard `OTEL_*` variables, read and checked like every other
//! setting, so a typo stops the process with a line naming the variable instead of the SDK
//! quietly falling back to a default.
//!
//! Read here rather than by the SDK from the process environment: tests build several
//! services in one process, each with its own receiver.

use std::time::Duration;

use super::settings::Settings;
use super::ConfigError;

/// Where and what to export; `None` in [`super::Config`] when no endpoint is set.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceSettings {
    /// The OTLP/HTTP traces URL (`…/v1/traces`).
    pub endpoint: String,
    /// `service.name`: `OTEL_SERVICE_NAME`, else the one in `OTEL_RESOURCE_ATTRIBUTES`.
    pub service_name: String,
    /// `OTEL_RESOURCE_ATTRIBUTES`, decoded, in order.
    pub resource: Vec<(String, String)>,
    pub sampler: TraceSampler,
    /// `OTEL_BSP_MAX_QUEUE_SIZE`: finished spans waiting for export; more are dropped.
    pub max_queue: usize,
    /// `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`: spans per export request.
    pub max_batch: usize,
    /// `OTEL_BSP_SCHEDULE_DELAY`: the longest a finished span waits to be sent.
    pub schedule_delay: Duration,
    /// `OTEL_EXPORTER_OTLP_TIMEOUT`: the longest one export request may take.
    pub export_timeout: Duration,
}

/// `OTEL_TRACES_SAMPLER` (and its `_ARG`), the values the specification defines.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TraceSampler {
    AlwaysOn,
    AlwaysOff,
    TraceIdRatio(f64),
    ParentBasedAlwaysOn,
    ParentBasedAlwaysOff,
    ParentBasedTraceIdRatio(f64),
}

const SAMPLERS: &str = "always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off or parentbased_traceidratio";

impl Settings<'_> {
    pub(super) fn tracing(&self) -> Result<Option<TraceSettings>, ConfigError> {
        if self.bool("OTEL_SDK_DISABLED", false)? {
            return Ok(None);
        }
        let endpoint = match (
            self.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            self.get("OTEL_EXPORTER_OTLP_ENDPOINT"),
        ) {
            // The signal's own URL is used as it is; the generic one gets the signal's path.
            (Some(url), _) => http_url("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", url)?,
            (None, Some(base)) => {
                let base = http_url("OTEL_EXPORTER_OTLP_ENDPOINT", base)?;
                format!("{}/v1/traces", base.trim_end_matches('/'))
            }
            (None, None) => return Ok(None),
        };
        let resource = match self.get("OTEL_RESOURCE_ATTRIBUTES") {
            Some(raw) => resource_attributes(&raw)
                .map_err(|problem| ConfigError::new("OTEL_RESOURCE_ATTRIBUTES", problem))?,
            None => Vec::new(),
        };
        let service_name = self
            .get("OTEL_SERVICE_NAME")
            .or_else(|| {
                resource
                    .iter()
                    .find(|(k, _)| k == "service.name")
                    .map(|(_, v)| v.clone())
            })
            .unwrap_or_else(|| "ensure-user".to_string());
        let max_queue = self.positive("OTEL_BSP_MAX_QUEUE_SIZE", 2048)?;
        let max_batch = self.positive("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)?;
        if max_batch > max_queue {
            return Err(ConfigError::new(
                "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
                format!("must not exceed OTEL_BSP_MAX_QUEUE_SIZE ({max_queue})"),
            ));
        }
        Ok(Some(TraceSettings {
            endpoint,
            service_name,
            resource,
            sampler: self.sampler()?,
            max_queue,
            max_batch,
            schedule_delay: self.millis("OTEL_BSP_SCHEDULE_DELAY", 5000)?,
            export_timeout: self.millis("OTEL_EXPORTER_OTLP_TIMEOUT", 10_000)?,
        }))
    }

    fn sampler(&self) -> Result<TraceSampler, ConfigError> {
        let name = self.string("OTEL_TRACES_SAMPLER", "parentbased_always_on");
        let ratio = || -> Result<f64, ConfigError> {
            let ratio: f64 = self.parse("OTEL_TRACES_SAMPLER_ARG", 1.0, "a number")?;
            if !(0.0..=1.0).contains(&ratio) {
                return Err(ConfigError::new(
                    "OTEL_TRACES_SAMPLER_ARG",
                    format!("{ratio} is not a ratio between 0 and 1"),
                ));
            }
            Ok(ratio)
        };
        Ok(match name.to_ascii_lowercase().as_str() {
            "always_on" => TraceSampler::AlwaysOn,
            "always_off" => TraceSampler::AlwaysOff,
            "traceidratio" => TraceSampler::TraceIdRatio(ratio()?),
            "parentbased_always_on" => TraceSampler::ParentBasedAlwaysOn,
            "parentbased_always_off" => TraceSampler::ParentBasedAlwaysOff,
            "parentbased_traceidratio" => TraceSampler::ParentBasedTraceIdRatio(ratio()?),
            other => {
                return Err(ConfigError::new(
                    "OTEL_TRACES_SAMPLER",
                    format!("{other:?} is not one of {SAMPLERS}"),
                ))
            }
        })
    }
}

/// An `http://host[:port][/path]` URL. No TLS is built in: the service exports to a
/// collector or agent beside it, which forwards wherever it must.
fn http_url(setting: &'static str, url: String) -> Result<String, ConfigError> {
    let problem = match url.parse::<hyper::Uri>() {
        Err(e) => format!("{url:?} is not a URL: {e}"),
        Ok(uri) if uri.scheme_str() == Some("https") => format!(
            "{url:?}: https is not supported; export over http to a collector beside the service"
        ),
        Ok(uri) if uri.scheme_str() != Some("http") || uri.host().is_none() => {
            format!("{url:?} is not an http://host[:port] URL")
        }
        Ok(_) => return Ok(url),
    };
    Err(ConfigError::new(setting, problem))
}

/// `key1=value1,key2=value2`, values percent-encoded (W3C Baggage octets).
pub(super) fn resource_attributes(raw: &str) -> Result<Vec<(String, String)>, String> {
    raw.split(',')
        .filter(|pair| !pair.trim().is_empty())
        .map(|pair| {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("{pair:?} is not key=value"))?;
            let key = key.trim();
            if key.is_empty() {
                return Err(format!("{pair:?} has no key"));
            }
            Ok((key.to_string(), percent_decode(value.trim())?))
        })
        .collect()
}

fn percent_decode(value: &str) -> Result<String, String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = value
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("{value:?} has a bad %-escape"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{value:?} does not decode to UTF-8"))
}
