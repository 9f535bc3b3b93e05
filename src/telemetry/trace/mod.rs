//! Traces: one OpenTelemetry trace from the HTTP request, through the queue, to the Engine
//! publish.
//!
//! Off unless an OTLP endpoint is set (`OTEL_EXPORTER_OTLP_ENDPOINT`). Then [`Tracing`] holds
//! the service's tracer and every [`TraceSpan`] is a live span; off, every `TraceSpan` is
//! empty and every call on it returns at once, so the hot path allocates nothing for traces.
//!
//! The context crosses the queue in the ingress entry's `trace` field: the listener's span as
//! a W3C `traceparent`, and its `tracestate` on a second line when there is one. A batch
//! serves many traces, so its span *links* to each entry's context, and each entry gets a
//! span of its own that *continues* its request's trace.

use std::sync::Arc;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::{
    Link, SpanKind, Status, TraceContextExt as _, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider, SpanExporter as _};
use opentelemetry_sdk::Resource;

use crate::config::{TraceSampler, TraceSettings};

mod export;

pub use opentelemetry::KeyValue as Attribute;

/// The service's tracer, or nothing when traces are off. Cheap to clone.
#[derive(Clone, Default)]
pub struct Tracing {
    live: Option<Arc<Live>>,
}

struct Live {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

impl Tracing {
    /// Starts exporting when `settings` say where to; `None` gives the tracer that does nothing.
    pub fn start(settings: Option<&TraceSettings>) -> anyhow::Result<Self> {
        let Some(settings) = settings else {
            return Ok(Self::default());
        };
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(settings.endpoint.clone())
            .with_timeout(settings.export_timeout)
            .build()
            .map_err(|e| anyhow::anyhow!("cannot build the OTLP exporter: {e}"))?;
        let resource = Resource::builder_empty()
            .with_attributes(
                settings
                    .resource
                    .iter()
                    .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
            )
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .with_service_name(settings.service_name.clone())
            .build();
        exporter.set_resource(&resource);
        let queue = export::SpanQueue::start(exporter, settings)?;
        let provider = SdkTracerProvider::builder()
            .with_span_processor(queue)
            .with_sampler(sampler(settings.sampler))
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("ensure-user");
        tracing::info!(endpoint = %settings.endpoint, service = %settings.service_name, "exporting traces");
        Ok(Self {
            live: Some(Arc::new(Live { provider, tracer })),
        })
    }

    /// Sends what is queued and stops the exporter. Blocks (at most a few seconds): call it
    /// off the async threads.
    pub fn shutdown(&self) {
        if let Some(live) = &self.live {
            if let Err(e) = live.provider.shutdown() {
                tracing::warn!(error = %e, "traces not all exported at shutdown");
            }
        }
    }

    /// A server span continuing the caller's trace when its headers carry a valid
    /// `traceparent`, else the root of a new trace. A malformed header is ignored.
    pub fn server_span(&self, name: &'static str, headers: &hyper::HeaderMap) -> TraceSpan {
        let Some(live) = &self.live else {
            return TraceSpan::default();
        };
        let parent = TraceContextPropagator::new().extract(&HeaderCarrier(headers));
        live.span(name, SpanKind::Server, &parent, Vec::new())
    }

    /// A span linked to each context carried in `carried` (entries without one add none).
    pub fn linked_span<'a>(
        &self,
        name: &'static str,
        carried: impl Iterator<Item = Option<&'a str>>,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> TraceSpan {
        let Some(live) = &self.live else {
            return TraceSpan::default();
        };
        let links = carried
            .filter_map(|c| c.and_then(decode_carried))
            .map(|cx| Link::with_context(cx.span().span_context().clone()))
            .collect();
        let span = live
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Consumer)
            .with_attributes(attributes())
            .with_links(links)
            .start_with_context(&live.tracer, &Context::new());
        TraceSpan::of(live, Context::new().with_span(span))
    }

    /// A span continuing the trace carried in an entry, linked to `batch`; without a (valid)
    /// carried context, a child of `batch`, so the entry's steps still show.
    pub fn continued_span(
        &self,
        name: &'static str,
        carried: Option<&str>,
        batch: &TraceSpan,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> TraceSpan {
        let (Some(live), Some(batch_cx)) = (&self.live, batch.context()) else {
            return TraceSpan::default();
        };
        let mut builder = live
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Consumer)
            .with_attributes(attributes());
        let parent = match carried.and_then(decode_carried) {
            Some(parent) => {
                builder = builder.with_links(vec![Link::with_context(
                    batch_cx.span().span_context().clone(),
                )]);
                parent
            }
            None => batch_cx.clone(),
        };
        let span = builder.start_with_context(&live.tracer, &parent);
        TraceSpan::of(live, parent.with_span(span))
    }
}

impl Live {
    fn span(
        self: &Arc<Self>,
        name: &'static str,
        kind: SpanKind,
        parent: &Context,
        attributes: Vec<KeyValue>,
    ) -> TraceSpan {
        let span = self
            .tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes)
            .start_with_context(&self.tracer, parent);
        TraceSpan::of(self, parent.with_span(span))
    }
}

/// One live span, or nothing when traces are off. The span ends when the last clone drops.
#[derive(Clone, Default)]
pub struct TraceSpan {
    live: Option<(Context, Arc<Live>)>,
}

impl TraceSpan {
    fn of(live: &Arc<Live>, cx: Context) -> Self {
        Self {
            live: Some((cx, live.clone())),
        }
    }

    fn context(&self) -> Option<&Context> {
        self.live.as_ref().map(|(cx, _)| cx)
    }

    /// The context of a span that records: a span the sampler dropped takes no attributes
    /// or events, so their closures need not run.
    fn recording(&self) -> Option<&Context> {
        self.context().filter(|cx| cx.span().is_recording())
    }

    pub fn is_on(&self) -> bool {
        self.live.is_some()
    }

    /// Adds attributes; `attributes` only runs when the span is live.
    pub fn set(&self, attributes: impl FnOnce() -> Vec<KeyValue>) {
        if let Some(cx) = self.recording() {
            cx.span().set_attributes(attributes());
        }
    }

    /// Records an event (a retry, a re-claim, a dead letter) with its attributes.
    pub fn event(&self, name: &'static str, attributes: impl FnOnce() -> Vec<KeyValue>) {
        if let Some(cx) = self.recording() {
            cx.span().add_event(name, attributes());
        }
    }

    /// Marks the span failed, with why.
    pub fn fail(&self, why: impl FnOnce() -> String) {
        if let Some(cx) = self.recording() {
            cx.span().set_status(Status::error(why()));
        }
    }

    /// A child span (internal), e.g. one step of an entry.
    pub fn child(&self, name: &'static str) -> TraceSpan {
        match &self.live {
            Some((cx, live)) => live.span(name, SpanKind::Internal, cx, Vec::new()),
            None => TraceSpan::default(),
        }
    }

    /// The ingress entry's `trace` field: this span's `traceparent`, then its `tracestate`
    /// on a second line when there is one.
    pub fn carried(&self) -> Option<String> {
        let cx = self.context()?;
        let mut carrier = Carrier::default();
        TraceContextPropagator::new().inject_context(cx, &mut carrier);
        let parent = carrier.traceparent?;
        Some(match carrier.tracestate.filter(|s| !s.is_empty()) {
            Some(state) => format!("{parent}\n{state}"),
            None => parent,
        })
    }

    /// A `tracing` span whose fields put this span's `trace_id` and `span_id` on every log
    /// line written inside it (text and JSON); a disabled span when traces are off. At the
    /// error level, so that `RUST_LOG=warn` (which would disable an info span) keeps them.
    pub fn log_span(&self) -> tracing::Span {
        match self.context() {
            Some(cx) => {
                let span = cx.span();
                let ids = span.span_context();
                tracing::error_span!(
                    "trace",
                    trace_id = %ids.trace_id(),
                    span_id = %ids.span_id()
                )
            }
            None => tracing::Span::none(),
        }
    }
}

/// A user id as traces show it: the first 16 hex digits of its SHA-256, so a trace can be
/// matched to a user the operator already knows, but never names one.
pub fn user_hash(user_id: &str) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(user_id.as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// The context an entry's `trace` field carries, when it is well formed.
fn decode_carried(field: &str) -> Option<Context> {
    let (parent, state) = match field.split_once('\n') {
        Some((p, s)) => (p, Some(s)),
        None => (field, None),
    };
    let carrier = Carrier {
        traceparent: Some(parent.to_string()),
        tracestate: state.map(str::to_string),
    };
    let cx = TraceContextPropagator::new().extract(&carrier);
    cx.span().span_context().is_valid().then_some(cx)
}

fn sampler(sampler: TraceSampler) -> Sampler {
    let parent_based = |root| Sampler::ParentBased(Box::new(root));
    match sampler {
        TraceSampler::AlwaysOn => Sampler::AlwaysOn,
        TraceSampler::AlwaysOff => Sampler::AlwaysOff,
        TraceSampler::TraceIdRatio(r) => Sampler::TraceIdRatioBased(r),
        TraceSampler::ParentBasedAlwaysOn => parent_based(Sampler::AlwaysOn),
        TraceSampler::ParentBasedAlwaysOff => parent_based(Sampler::AlwaysOff),
        TraceSampler::ParentBasedTraceIdRatio(r) => parent_based(Sampler::TraceIdRatioBased(r)),
    }
}

/// The two W3C trace-context fields, for the entry's `trace` field.
#[derive(Default)]
struct Carrier {
    traceparent: Option<String>,
    tracestate: Option<String>,
}

impl Injector for Carrier {
    fn set(&mut self, key: &str, value: String) {
        match key {
            "traceparent" => self.traceparent = Some(value),
            "tracestate" => self.tracestate = Some(value),
            _ => {}
        }
    }
}

impl Extractor for Carrier {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => self.traceparent.as_deref(),
            "tracestate" => self.tracestate.as_deref(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

/// A request's headers, as the propagator reads them.
struct HeaderCarrier<'a>(&'a hyper::HeaderMap);

impl Extractor for HeaderCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

#[cfg(test)]
mod tests;
