package telemetry

import (
	"net/http"

	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Metric labels.
const (
	LabelTarget   = "target"
	LabelState    = "state"
	LabelReason   = "reason"
	LabelDelivery = "delivery" // first or redelivery
	LabelTenant   = "tenant"
	LabelHow      = "how"
)

// latencyBuckets span a pod that starts in a few hundred milliseconds to a queue that backs
// up for half an hour.
var latencyBuckets = []float64{.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800}

// Metrics are one replica's Prometheus metrics. Counters count what this replica did, so a
// fleet's totals are their sum across replicas (sum by (target) (rate(...))); each build's
// dispatch and end is counted once across the fleet, by the replica whose write made it.
type Metrics struct {
	registry *prometheus.Registry

	// RequestsReceived counts request deliveries: "first", or a "redelivery" (a retry, a
	// handover, an adoption after a crash).
	RequestsReceived *prometheus.CounterVec
	// BuildsRejected counts builds rejected, by reason (invalid_request, excluded_image, …).
	BuildsRejected *prometheus.CounterVec
	// BuildsDispatched counts workloads launched, by target.
	BuildsDispatched *prometheus.CounterVec
	// BuildsFinished counts builds that ended, by target, terminal state and reason.
	BuildsFinished *prometheus.CounterVec
	// QueueToDispatch is the time from queued to dispatched (the workload launched).
	QueueToDispatch *prometheus.HistogramVec
	// DispatchToRunning is the time from dispatched to running (the pod scheduled, its
	// image pulled, its container started).
	DispatchToRunning *prometheus.HistogramVec

	// BuildsTakenOver counts builds this replica's claims took from another replica, by
	// how: "handover" (given back, as a shutdown does) or "recovery" (its owner vanished).
	BuildsTakenOver *prometheus.CounterVec

	// BuildsAdmitted counts builds the scheduler let start, by tenant.
	BuildsAdmitted *prometheus.CounterVec
	// QueueWait is the time from queued to admitted, by tenant: what fair share decides.
	QueueWait *prometheus.HistogramVec
	// Fleet-wide counts as the run stream states them: every replica reports the same
	// values (aggregate with max, not sum).
	TargetRunning *prometheus.GaugeVec
	TargetCap     *prometheus.GaugeVec
	TenantRunning *prometheus.GaugeVec
	// TenantWaiting is what the scheduling replica holds waiting, by tenant (0 on the
	// others: aggregate with sum).
	TenantWaiting *prometheus.GaugeVec
}

// NewMetrics makes the metrics on a registry of their own, with the Go runtime and process
// collectors beside them.
func NewMetrics() *Metrics {
	r := prometheus.NewRegistry()
	r.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	f := func(c prometheus.Collector) prometheus.Collector { r.MustRegister(c); return c }
	return &Metrics{
		registry: r,
		RequestsReceived: f(prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "buildfleet_requests_received_total",
			Help: "Admitted builds taken to run (run stream deliveries), first or redelivered.",
		}, []string{LabelDelivery})).(*prometheus.CounterVec),
		BuildsRejected: f(prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "buildfleet_builds_rejected_total",
			Help: "Builds rejected, by reason.",
		}, []string{LabelReason})).(*prometheus.CounterVec),
		BuildsDispatched: f(prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "buildfleet_builds_dispatched_total",
			Help: "Build workloads launched, by target.",
		}, []string{LabelTarget})).(*prometheus.CounterVec),
		BuildsFinished: f(prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "buildfleet_builds_finished_total",
			Help: "Builds that reached a terminal state, by target, state and reason.",
		}, []string{LabelTarget, LabelState, LabelReason})).(*prometheus.CounterVec),
		QueueToDispatch: f(prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "buildfleet_queue_to_dispatch_seconds",
			Help:    "Time from a build being queued to its workload being launched.",
			Buckets: latencyBuckets,
		}, []string{LabelTarget})).(*prometheus.HistogramVec),
		DispatchToRunning: f(prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "buildfleet_dispatch_to_running_seconds",
			Help:    "Time from a build's workload being launched to it running.",
			Buckets: latencyBuckets,
		}, []string{LabelTarget})).(*prometheus.HistogramVec),
		BuildsTakenOver: f(prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "buildfleet_builds_taken_over_total",
			Help: "Builds taken from another replica, by how: handover (given back) or recovery (its owner vanished).",
		}, []string{LabelHow})).(*prometheus.CounterVec),
		BuildsAdmitted: f(prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "buildfleet_builds_admitted_total",
			Help: "Builds the scheduler let start, by tenant.",
		}, []string{LabelTenant})).(*prometheus.CounterVec),
		QueueWait: f(prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "buildfleet_queue_wait_seconds",
			Help:    "Time from queued to admitted (let start), by tenant.",
			Buckets: latencyBuckets,
		}, []string{LabelTenant})).(*prometheus.HistogramVec),
		TargetRunning: f(prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "buildfleet_target_running_builds",
			Help: "Builds admitted to each target that have not ended, fleet-wide (the same on every replica).",
		}, []string{LabelTarget})).(*prometheus.GaugeVec),
		TargetCap: f(prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "buildfleet_target_max_running_builds",
			Help: "Each target's cap on running builds (0: none).",
		}, []string{LabelTarget})).(*prometheus.GaugeVec),
		TenantRunning: f(prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "buildfleet_tenant_running_builds",
			Help: "Builds of each tenant admitted that have not ended, fleet-wide (the same on every replica).",
		}, []string{LabelTenant})).(*prometheus.GaugeVec),
		TenantWaiting: f(prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "buildfleet_tenant_waiting_builds",
			Help: "Builds of each tenant this replica holds waiting to be admitted (only the scheduling replica holds any).",
		}, []string{LabelTenant})).(*prometheus.GaugeVec),
	}
}

// Handler serves the metrics in the Prometheus exposition format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.registry, promhttp.HandlerOpts{Registry: m.registry})
}

// ObserveNATS exports the state of the replica's NATS connection, as conn returns it (nil
// before the first connection): buildfleet_nats_connected (1 or 0) and
// buildfleet_nats_reconnects_total.
func (m *Metrics) ObserveNATS(conn func() *nats.Conn) {
	m.registry.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "buildfleet_nats_connected",
			Help: "1 while the replica's NATS connection is up, else 0.",
		}, func() float64 {
			if nc := conn(); nc != nil && nc.IsConnected() {
				return 1
			}
			return 0
		}),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "buildfleet_nats_reconnects_total",
			Help: "Times the replica's NATS connection was re-established.",
		}, func() float64 {
			if nc := conn(); nc != nil {
				return float64(nc.Stats().Reconnects)
			}
			return 0
		}),
	)
}

// BreakerStates are the possible values of the state label of buildfleet_breaker_state.
var BreakerStates = []string{"closed", "half-open", "open"}

// ObserveWorker exports what the running worker knows, read at every scrape:
// buildfleet_builds_in_flight, the build deliveries it holds (inFlight), and each target's
// circuit breaker as buildfleet_breaker_state{target,state}, 1 for the state it is in and 0
// for the others (breakers).
func (m *Metrics) ObserveWorker(inFlight func() int, breakers func() map[string]string) {
	m.registry.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "buildfleet_builds_in_flight",
			Help: "Build deliveries this replica holds now.",
		}, func() float64 { return float64(inFlight()) }),
		&breakerCollector{states: breakers, desc: prometheus.NewDesc("buildfleet_breaker_state",
			"Circuit breaker state of each target's launches: 1 for the current state.", []string{LabelTarget, LabelState}, nil)},
	)
}

type breakerCollector struct {
	states func() map[string]string
	desc   *prometheus.Desc
}

func (c *breakerCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c *breakerCollector) Collect(ch chan<- prometheus.Metric) {
	for target, state := range c.states() {
		for _, s := range BreakerStates {
			v := 0.0
			if s == state {
				v = 1
			}
			ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, v, target, s)
		}
	}
}
