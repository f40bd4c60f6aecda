//! Logs as Cloud Logging reads them, and traces and metrics over OTLP when asked for.
//!
//! Cloud Run forwards a container's stdout/stderr to Cloud Logging, which parses a JSON line into
//! a structured entry when it finds `severity`, `message` and `time`, and ties it to a trace
//! through `logging.googleapis.com/trace` (`projects/PROJECT/traces/ID`); any other field lands in
//! `jsonPayload`. `RUST_LOG` selects what is logged (default `info`).
//!
//! Spans always get OpenTelemetry ids (so logs carry the caller's trace), but they are exported
//! only when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set:
//! with neither, nothing connects anywhere.

use std::{fmt, io, time::Duration};

use opentelemetry::{KeyValue, trace::TracerProvider as _};
use opentelemetry_sdk::{
    Resource, metrics::SdkMeterProvider, propagation::TraceContextPropagator,
    trace::SdkTracerProvider,
};
use runmesh_config::Env;
use serde_json::{Map, Value};
use tracing::{Event, Level, Subscriber, field::Field};
use tracing_subscriber::{
    EnvFilter, Layer,
    fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields, format::Writer},
    layer::SubscriberExt,
    registry::LookupSpan,
    util::SubscriberInitExt,
};

use crate::{Identity, LogFormat};

/// Span fields the JSON format turns into Cloud Logging's trace keys.
pub const TRACE_ID_FIELD: &str = "trace_id";
/// See [`TRACE_ID_FIELD`].
pub const SPAN_ID_FIELD: &str = "span_id";
/// See [`TRACE_ID_FIELD`].
pub const SAMPLED_FIELD: &str = "trace_sampled";

/// Keeps the trace and metric pipelines alive; [`Telemetry::shutdown`] flushes them.
#[derive(Debug)]
pub struct Telemetry {
    tracer: SdkTracerProvider,
    meter: Option<SdkMeterProvider>,
}

impl Telemetry {
    /// Exports what is still buffered; called once the drain is over.
    pub async fn shutdown(self) {
        let flush = tokio::task::spawn_blocking(move || {
            let _ = self.tracer.shutdown();
            if let Some(m) = self.meter {
                let _ = m.shutdown();
            }
        });
        let _ = tokio::time::timeout(Duration::from_secs(5), flush).await;
    }
}

fn otlp_configured(env: &impl Env) -> bool {
    env.get("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
        || env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
}

/// The Cloud project that trace ids in logs belong to: `GOOGLE_CLOUD_PROJECT`, else the metadata
/// server's answer when running on Google Cloud (Cloud Run sets `K_SERVICE`) or told where it is.
async fn cloud_project(env: &impl Env) -> Option<String> {
    if let Some(p) = env.get("GOOGLE_CLOUD_PROJECT") {
        return Some(p);
    }
    let host = match env.get("GCE_METADATA_HOST") {
        Some(h) => h,
        None if env.get("K_SERVICE").is_some() => "metadata.google.internal".to_string(),
        None => return None,
    };
    let url = format!("http://{host}/computeMetadata/v1/project/project-id");
    let res = reqwest::Client::new()
        .get(url)
        .header("Metadata-Flavor", "Google")
        .timeout(Duration::from_millis(500))
        .send()
        .await
        .ok()?;
    if !res.status().is_success() {
        return None;
    }
    res.text().await.ok().filter(|p| !p.trim().is_empty())
}

/// Installs logs, traces and metrics for `identity`; a second call (tests) installs nothing.
pub async fn init(format: LogFormat, identity: &Identity, env: &impl Env) -> Telemetry {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let resource = Resource::builder()
        .with_service_name(
            env.get("K_SERVICE")
                .unwrap_or_else(|| identity.service.to_string()),
        )
        .with_attributes([
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("service.instance.id", identity.instance.clone()),
        ])
        .build();
    let mut tracer = SdkTracerProvider::builder().with_resource(resource.clone());
    let mut meter = None;
    let mut export_error = None;
    if otlp_configured(env) {
        match opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
        {
            Ok(exporter) => tracer = tracer.with_batch_exporter(exporter),
            Err(e) => export_error = Some(e.to_string()),
        }
        match opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .build()
        {
            Ok(exporter) => {
                let provider = SdkMeterProvider::builder()
                    .with_resource(resource)
                    .with_reader(
                        opentelemetry_sdk::metrics::PeriodicReader::builder(exporter).build(),
                    )
                    .build();
                opentelemetry::global::set_meter_provider(provider.clone());
                crate::observe::enable_metrics();
                meter = Some(provider);
            }
            Err(e) => export_error = Some(e.to_string()),
        }
    }
    let tracer = tracer.build();
    let otel = tracing_opentelemetry::layer().with_tracer(tracer.tracer("runmesh"));
    install(format, "info", Some(otel));
    if let Some(e) = export_error {
        tracing::error!(error = %e, "OTLP exporter not built; telemetry is not exported");
    }
    let project = cloud_project(env).await;
    let _ = PROJECT.set(project);
    Telemetry { tracer, meter }
}

static PROJECT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

/// Logs only, with `default` as the filter when `RUST_LOG` is unset (the CLI's own output).
pub fn init_with_default(format: LogFormat, default: &str) {
    install::<tracing_opentelemetry::OpenTelemetryLayer<_, opentelemetry_sdk::trace::SdkTracer>>(
        format, default, None,
    );
}

fn install<L>(format: LogFormat, default: &str, otel: Option<L>)
where
    L: Layer<tracing_subscriber::layer::Layered<EnvFilter, tracing_subscriber::Registry>>
        + Send
        + Sync
        + 'static,
{
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let fmt = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(CloudLogging)
            .with_writer(io::stderr)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_target(false)
            .with_writer(io::stderr)
            .boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(otel)
        .with(fmt)
        .try_init();
}

/// Formats events as Cloud Logging structured JSON lines.
#[derive(Debug, Clone, Copy, Default)]
pub struct CloudLogging;

/// Cloud Logging's name for a tracing level.
pub fn severity(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "ERROR",
        Level::WARN => "WARNING",
        Level::INFO => "INFO",
        Level::DEBUG | Level::TRACE => "DEBUG",
    }
}

impl<S, N> FormatEvent<S, N> for CloudLogging
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut entry = Map::new();
        entry.insert("severity".into(), severity(meta.level()).into());
        entry.insert(
            "time".into(),
            humantime::format_rfc3339_micros(std::time::SystemTime::now())
                .to_string()
                .into(),
        );
        entry.insert("target".into(), meta.target().into());
        // Span fields first, so an event's own field of the same name wins.
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let ext = span.extensions();
                if let Some(fields) = ext.get::<FormattedFields<N>>()
                    && let Ok(Value::Object(map)) = serde_json::from_str::<Value>(fields)
                {
                    entry.extend(map);
                }
            }
        }
        let mut visitor = JsonVisitor(&mut entry);
        event.record(&mut visitor);
        entry.entry("message").or_insert_with(|| "".into());
        cloud_trace_keys(&mut entry);
        let line = serde_json::to_string(&entry).map_err(|_| fmt::Error)?;
        writeln!(writer, "{line}")
    }
}

/// Moves the span's trace ids to the keys Cloud Logging links to Cloud Trace.
fn cloud_trace_keys(entry: &mut Map<String, Value>) {
    let Some(Value::String(trace)) = entry.remove(TRACE_ID_FIELD) else {
        return;
    };
    let name = match PROJECT.get().and_then(Option::as_deref) {
        Some(project) => format!("projects/{project}/traces/{trace}"),
        None => trace,
    };
    entry.insert("logging.googleapis.com/trace".into(), name.into());
    if let Some(span) = entry.remove(SPAN_ID_FIELD) {
        entry.insert("logging.googleapis.com/spanId".into(), span);
    }
    if let Some(sampled) = entry.remove(SAMPLED_FIELD) {
        entry.insert("logging.googleapis.com/trace_sampled".into(), sampled);
    }
}

struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl tracing::field::Visit for JsonVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_are_cloud_logging_json() {
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(CloudLogging)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("rpc", method = "Send");
            let _g = span.enter();
            tracing::warn!(code = 14, "upstream unreachable");
        });
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let line: Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(line["severity"], "WARNING");
        assert_eq!(line["message"], "upstream unreachable");
        assert_eq!(line["method"], "Send");
        assert_eq!(line["code"], 14);
        assert!(humantime::parse_rfc3339(line["time"].as_str().unwrap()).is_ok());
    }
}
