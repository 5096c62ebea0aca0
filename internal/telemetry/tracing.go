// Package telemetry is how a replica is watched: OpenTelemetry tracing set up from the
// standard OTEL_* variables, Prometheus metrics, and the HTTP endpoints a platform scrapes and
// probes (/metrics, /healthz, /readyz).
package telemetry

import (
	"context"
	"fmt"
	"os"
	"strings"

	"go.opentelemetry.io/contrib/exporters/autoexport"
	"go.opentelemetry.io/contrib/propagators/autoprop"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.40.0"
)

// TracingConfigured reports whether the environment asks for spans to be exported: an
// exporter named in OTEL_TRACES_EXPORTER, or an OTLP endpoint, and the SDK not disabled.
// With none of these nothing is exported, and tracing costs next to nothing.
func TracingConfigured(getenv func(string) string) bool {
	if strings.EqualFold(getenv("OTEL_SDK_DISABLED"), "true") || strings.EqualFold(getenv("OTEL_TRACES_EXPORTER"), "none") {
		return false
	}
	for _, k := range []string{"OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"} {
		if getenv(k) != "" {
			return true
		}
	}
	return false
}

// SetupTracing installs the global propagator chosen by OTEL_PROPAGATORS (W3C trace context
// and baggage when unset) and, when TracingConfigured, a global tracer provider exporting
// spans through the exporter the OTEL_* variables choose (OTLP over gRPC or HTTP, console,
// none), as the contrib autoexport package reads them. service names the process
// (OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES override it). The returned function flushes
// and stops the exporter; call it on the way out.
func SetupTracing(ctx context.Context, service, version string) (shutdown func(context.Context) error, err error) {
	prop := autoprop.NewTextMapPropagator()
	otel.SetTextMapPropagator(prop)
	if !TracingConfigured(os.Getenv) {
		return func(context.Context) error { return nil }, nil
	}
	exp, err := autoexport.NewSpanExporter(ctx)
	if err != nil {
		return nil, fmt.Errorf("OTEL_TRACES_EXPORTER/OTEL_EXPORTER_OTLP_*: %w", err)
	}
	res, err := resource.New(ctx,
		resource.WithAttributes(semconv.ServiceName(service), semconv.ServiceVersion(version)),
		resource.WithTelemetrySDK(),
		resource.WithHost(),
		resource.WithFromEnv(), // last: OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win
	)
	if err != nil {
		return nil, fmt.Errorf("OTEL_RESOURCE_ATTRIBUTES: %w", err)
	}
	tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exp), sdktrace.WithResource(res))
	otel.SetTracerProvider(tp)
	return tp.Shutdown, nil
}
