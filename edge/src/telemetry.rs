//! OpenTelemetry: one span per call, exported over OTLP/HTTP (protobuf) when
//! `telemetry.otlp_endpoint` is set.
//!
//! The span's parent is the client's W3C `traceparent` (when valid), the upstream receives a
//! `traceparent` naming the edge's span, and the trace id goes into the call's event, so a
//! trace, a log line and a metered call can be joined. Spans are batched by the SDK's
//! background thread; the export itself runs on the edge's tokio runtime through the same
//! hyper client stack as everything else (no second HTTP stack).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};

use crate::config::TelemetryConfig;

/// The tracer provider; flushes on [`Telemetry::shutdown`].
#[derive(Debug)]
pub struct Telemetry {
    provider: SdkTracerProvider,
}

/// The `tracing` layer that turns spans into OpenTelemetry spans.
pub type OtelLayer =
    tracing_opentelemetry::OpenTelemetryLayer<tracing_subscriber::Registry, opentelemetry_sdk::trace::Tracer>;

impl Telemetry {
    /// Builds the exporter (on `runtime`) and the layer to install in the subscriber.
    pub fn start(
        cfg: &TelemetryConfig,
        tls: &std::sync::Arc<rustls::ClientConfig>,
        runtime: tokio::runtime::Handle,
    ) -> anyhow::Result<(Self, OtelLayer)> {
        let endpoint =
            cfg.otlp_endpoint.as_ref().ok_or_else(|| anyhow::anyhow!("telemetry.otlp_endpoint is not set"))?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(endpoint.to_string())
            .with_timeout(cfg.export_timeout)
            .with_http_client(TokioClient { runtime, client: crate::proxy::client(Duration::from_secs(2), tls) })
            .build()?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(cfg.sample_ratio))))
            .with_resource(opentelemetry_sdk::Resource::builder().with_service_name(cfg.service_name.clone()).build())
            .build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("tollgate-edge"));
        Ok((Self { provider }, layer))
    }

    /// Exports what is still buffered (blocking; call outside the runtime).
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown_with_timeout(Duration::from_secs(5)) {
            tracing::warn!(error = %e, "OpenTelemetry shutdown");
        }
    }
}

/// Sends OTLP requests with the edge's hyper client, on the edge's runtime (the SDK calls the
/// exporter from its own thread, where there is no runtime).
#[derive(Debug)]
struct TokioClient {
    runtime: tokio::runtime::Handle,
    client: crate::proxy::HttpClient,
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for TokioClient {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        let client = self.client.clone();
        let task = self.runtime.spawn(async move {
            let resp = client.request(request.map(axum::body::Body::from)).await?;
            let (parts, body) = resp.into_parts();
            let body =
                http_body_util::Limited::new(body, 1 << 20).collect().await.map_err(|e| e.to_string())?.to_bytes();
            Ok::<_, opentelemetry_http::HttpError>(http::Response::from_parts(parts, body))
        });
        task.await?
    }
}

/// The OpenTelemetry context of a client's `traceparent` headers (empty when absent/invalid).
pub fn extract_parent(headers: &http::HeaderMap) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(&opentelemetry_http::HeaderExtractor(headers))
}

/// Writes `traceparent` (and `tracestate`) for `cx` into `headers`.
pub fn inject(cx: &opentelemetry::Context, headers: &mut http::HeaderMap) {
    TraceContextPropagator::new().inject_context(cx, &mut opentelemetry_http::HeaderInjector(headers));
}
