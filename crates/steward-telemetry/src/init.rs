//! Installs the global `metrics` recorder and the `tracing` subscriber: Prometheus always,
//! OTLP (metrics and traces) when `OTEL_EXPORTER_OTLP_ENDPOINT` (or the signal-specific
//! variant) is set. The OTLP exporters read the other standard `OTEL_*` variables themselves.

use crate::names::*;
use metrics::Unit;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::layers::FanoutBuilder;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::metrics::{
    Aggregation, Instrument, PeriodicReader, SdkMeterProvider, Stream,
};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot configure Prometheus histograms: {0}")]
    Prometheus(String),
    #[error("cannot set up the OTLP exporter: {0}")]
    Otlp(String),
    #[error("a metrics recorder is already installed")]
    AlreadyInstalled,
    #[error(
        "{variable}={value:?} is not supported: Steward exports OTLP over gRPC only \
         (the collector's gRPC receiver, usually port 4317); unset {variable} or set it to grpc"
    )]
    UnsupportedOtlpProtocol {
        variable: &'static str,
        value: String,
    },
}

/// The variables that choose the OTLP transport, general first.
const PROTOCOL_VARIABLES: [&str; 3] = [
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
];

/// Steward's exporters speak gRPC only: a protocol variable set to anything else (e.g.
/// http/protobuf, with an endpoint on the collector's HTTP port 4318) would otherwise be
/// ignored and every export would fail at run time. Empty counts as unset.
fn check_otlp_protocol(lookup: impl Fn(&str) -> Option<String>) -> Result<(), TelemetryError> {
    for variable in PROTOCOL_VARIABLES {
        if let Some(value) = lookup(variable) {
            let protocol = value.trim();
            if !protocol.is_empty() && protocol != "grpc" {
                return Err(TelemetryError::UnsupportedOtlpProtocol { variable, value });
            }
        }
    }
    Ok(())
}

/// Live telemetry; [`Telemetry::shutdown`] flushes OTLP before exit.
pub struct Telemetry {
    prometheus: PrometheusHandle,
    meter_provider: Option<SdkMeterProvider>,
    tracer_provider: Option<SdkTracerProvider>,
}

fn otlp_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|s| !s.is_empty()))
}

fn buckets_for(name: &str) -> Option<&'static [f64]> {
    match name {
        BRANCH_DURATION => Some(DURATION_BUCKETS),
        BRANCH_START_DELAY | PROMOTION_LAG => Some(LATENCY_BUCKETS),
        _ => None,
    }
}

fn describe() {
    metrics::describe_histogram!(
        BRANCH_DURATION,
        Unit::Seconds,
        "Duration of a maintenance branch pass"
    );
    metrics::describe_histogram!(
        BRANCH_START_DELAY,
        Unit::Seconds,
        "How late a branch pass started after it was due"
    );
    metrics::describe_counter!(BRANCH_OVERRUN, "Overrun episodes: a branch turned delayed (duration or start delay above 1.5x its interval, 3 times in a row)");
    metrics::describe_gauge!(
        BRANCH_DELAYED,
        "1 while the branch is delayed (since 3 passes in a row whose duration or start delay exceeded 1.5x the interval, until 3 in a row below 0.7x), else 0"
    );
    metrics::describe_counter!(BRANCH_RUNS, "Branch passes by outcome");
    metrics::describe_counter!(BRANCH_ROWS, "Rows changed by branch passes");
    metrics::describe_gauge!(
        BRANCH_LAST_SUCCESS,
        Unit::Seconds,
        "Unix time of the branch's last successful pass"
    );
    metrics::describe_gauge!(
        BRANCH_INTERVAL,
        Unit::Seconds,
        "The branch's configured interval"
    );
    metrics::describe_counter!(
        BRANCH_SKIPPED,
        "Rows a branch could not use and skipped (e.g. a malformed cron expression)"
    );
    metrics::describe_counter!(
        LOOP_RESTARTS,
        "Maintenance loops restarted after dying outside a branch"
    );
    metrics::describe_gauge!(
        LEADER,
        "1 while this instance leads the queue (labels schema, database); label instance is the Steward instance name"
    );
    metrics::describe_gauge!(
        LEADER_EPOCH,
        "Epoch of this instance's current or last term of the queue; label instance is the Steward instance name"
    );
    metrics::describe_counter!(
        LEADER_TRANSITIONS,
        "Leadership transitions of this instance"
    );
    metrics::describe_histogram!(
        PROMOTION_LAG,
        Unit::Seconds,
        "now - run_at when a job was promoted"
    );
    metrics::describe_counter!(RESCUED_JOBS, "Jobs rescued, by reason");
    metrics::describe_gauge!(QUEUE_JOBS, "Jobs per queue and state (non-terminal states)");
    metrics::describe_gauge!(
        QUEUE_OLDEST_AVAILABLE_AGE,
        Unit::Seconds,
        "Age of the oldest available job per queue"
    );
}

impl Telemetry {
    /// Installs everything; call once, early, from inside a Tokio runtime.
    pub fn init(log_format: LogFormat) -> Result<Telemetry, TelemetryError> {
        check_otlp_protocol(|v| std::env::var(v).ok())?;
        let mut prometheus = PrometheusBuilder::new();
        for name in [BRANCH_DURATION, BRANCH_START_DELAY, PROMOTION_LAG] {
            let buckets = buckets_for(name).unwrap_or(DURATION_BUCKETS);
            prometheus = prometheus
                .set_buckets_for_metric(Matcher::Full(name.to_owned()), buckets)
                .map_err(|e| TelemetryError::Prometheus(e.to_string()))?;
        }
        let prometheus = prometheus.build_recorder();
        let handle = prometheus.handle();

        let (meter_provider, tracer_provider) = if otlp_configured() {
            let resource = Resource::builder()
                .with_service_name(service_name())
                .build();
            let metric_exporter = opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .build()
                .map_err(|e| TelemetryError::Otlp(e.to_string()))?;
            let reader = PeriodicReader::builder(metric_exporter).build();
            let (meter_provider, otel_recorder) =
                metrics_exporter_opentelemetry::Recorder::builder("steward")
                    .with_meter_provider(|b| {
                        b.with_resource(resource.clone())
                            .with_reader(reader)
                            .with_view(|instrument: &Instrument| {
                                let boundaries = buckets_for(instrument.name())?;
                                Stream::builder()
                                    .with_aggregation(Aggregation::ExplicitBucketHistogram {
                                        boundaries: boundaries.to_vec(),
                                        record_min_max: true,
                                    })
                                    .build()
                                    .ok()
                            })
                    })
                    .build();
            let span_exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()
                .map_err(|e| TelemetryError::Otlp(e.to_string()))?;
            let tracer_provider = SdkTracerProvider::builder()
                .with_resource(resource)
                .with_batch_exporter(span_exporter)
                .build();
            let fanout = FanoutBuilder::default()
                .add_recorder(prometheus)
                .add_recorder(otel_recorder)
                .build();
            metrics::set_global_recorder(fanout).map_err(|_| TelemetryError::AlreadyInstalled)?;
            (Some(meter_provider), Some(tracer_provider))
        } else {
            metrics::set_global_recorder(prometheus)
                .map_err(|_| TelemetryError::AlreadyInstalled)?;
            (None, None)
        };
        describe();

        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
        // Colours only for a person at a terminal: log files and collectors get plain text.
        let fmt = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
        let fmt = match log_format {
            LogFormat::Human => fmt.boxed(),
            LogFormat::Json => fmt.json().boxed(),
        };
        let otel = tracer_provider
            .as_ref()
            .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("steward")));
        tracing_subscriber::registry()
            .with(filter)
            .with(fmt)
            .with(otel)
            .init();

        // Prometheus histograms keep their state in buckets drained on upkeep.
        let upkeep = handle.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
            loop {
                tick.tick().await;
                upkeep.run_upkeep();
            }
        });
        Ok(Telemetry {
            prometheus: handle,
            meter_provider,
            tracer_provider,
        })
    }

    pub fn prometheus(&self) -> PrometheusHandle {
        self.prometheus.clone()
    }

    pub fn otlp_enabled(&self) -> bool {
        self.meter_provider.is_some()
    }

    /// Flushes and stops the OTLP exporters (no-op without OTLP).
    pub fn shutdown(self) {
        if let Some(provider) = self.meter_provider {
            if let Err(error) = provider.shutdown() {
                eprintln!("steward: flushing OTLP metrics failed: {error}");
            }
        }
        if let Some(provider) = self.tracer_provider {
            if let Err(error) = provider.shutdown() {
                eprintln!("steward: flushing OTLP traces failed: {error}");
            }
        }
    }
}

fn service_name() -> String {
    std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "steward".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(vars: &[(&str, &str)]) -> Result<(), TelemetryError> {
        check_otlp_protocol(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn only_grpc_is_accepted_as_the_otlp_protocol() {
        assert!(check(&[]).is_ok());
        assert!(check(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]).is_ok());
        assert!(check(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "")]).is_ok());
        for variable in PROTOCOL_VARIABLES {
            for value in ["http/protobuf", "http/json"] {
                let error = check(&[(variable, value)]).unwrap_err().to_string();
                assert!(
                    error.contains(&format!("{variable}=\"{value}\""))
                        && error.contains("gRPC only")
                        && error.contains("4317"),
                    "{error}"
                );
            }
        }
        // A signal-specific variable is checked even when the general one says grpc.
        let error = check(&[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "http/protobuf"),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"),
            "{error}"
        );
    }
}
