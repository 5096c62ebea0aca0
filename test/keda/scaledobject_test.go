package keda_test

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/google/go-cmp/cmp"
	"github.com/kedacore/keda/v2/pkg/scalers"
	"github.com/kedacore/keda/v2/pkg/scalers/scalersconfig"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	ctrllog "sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/yaml"

	"github.com/buildfleet/buildfleet/internal/queue"
	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// scaledObjectFile is the ScaledObject as shipped; the test reads its triggers and replica
// bounds rather than repeating them.
const scaledObjectFile = "../../deploy/overlays/keda/scaledobject.yaml"

// Trigger types of the shipped ScaledObject.
const (
	natsJetStreamTrigger = "nats-jetstream"
	cpuTrigger           = "cpu"
)

// globalHTTPTimeout is KEDA's default (KEDA_HTTP_DEFAULT_TIMEOUT, 3000 ms).
const globalHTTPTimeout = 3 * time.Second

func TestMain(m *testing.M) {
	// KEDA's scalers log through controller-runtime's global logger, which complains on
	// stderr when nothing was set. What the scaler logs on failure it also returns.
	ctrllog.SetLogger(logr.Discard())
	os.Exit(m.Run())
}

// scaledObject is what this test takes from the shipped ScaledObject.
type scaledObject struct {
	name, namespace          string
	minReplicas, maxReplicas int64
	triggers                 []trigger
}

// trigger is one entry of spec.triggers.
type trigger struct {
	index      int // its position: KEDA names the HPA's metric after it (s0-…, s1-…)
	typ        string
	metricType string
	metadata   map[string]string
}

// loadScaledObject reads the shipped ScaledObject. It is decoded as unstructured JSON, which
// keeps integers integers (sigs.k8s.io/yaml alone would give float64).
func loadScaledObject(t *testing.T) scaledObject {
	t.Helper()
	data, err := os.ReadFile(scaledObjectFile)
	if err != nil {
		t.Fatal(err)
	}
	js, err := yaml.YAMLToJSON(data)
	if err != nil {
		t.Fatalf("%s: %v", scaledObjectFile, err)
	}
	var obj unstructured.Unstructured
	if err := obj.UnmarshalJSON(js); err != nil {
		t.Fatalf("%s: %v", scaledObjectFile, err)
	}
	if gvk := obj.GroupVersionKind(); gvk.Group != "keda.sh" || gvk.Kind != "ScaledObject" {
		t.Fatalf("%s holds a %s, want a keda.sh ScaledObject", scaledObjectFile, gvk)
	}
	so := scaledObject{name: obj.GetName(), namespace: obj.GetNamespace()}
	so.minReplicas = required[int64](t, "spec.minReplicaCount")(unstructured.NestedInt64(obj.Object, "spec", "minReplicaCount"))
	so.maxReplicas = required[int64](t, "spec.maxReplicaCount")(unstructured.NestedInt64(obj.Object, "spec", "maxReplicaCount"))
	raw := required[[]any](t, "spec.triggers")(unstructured.NestedSlice(obj.Object, "spec", "triggers"))
	for i, r := range raw {
		m, ok := r.(map[string]any)
		if !ok {
			t.Fatalf("%s: spec.triggers[%d] is a %T, want an object", scaledObjectFile, i, r)
		}
		field := fmt.Sprintf("spec.triggers[%d]", i)
		tr := trigger{index: i, typ: required[string](t, field+".type")(unstructured.NestedString(m, "type"))}
		// Both are optional to KEDA: an empty metricType is AverageValue.
		if tr.metricType, _, err = unstructured.NestedString(m, "metricType"); err != nil {
			t.Fatalf("%s: %s.metricType: %v", scaledObjectFile, field, err)
		}
		if tr.metadata, _, err = unstructured.NestedStringMap(m, "metadata"); err != nil {
			t.Fatalf("%s: %s.metadata: %v", scaledObjectFile, field, err)
		}
		so.triggers = append(so.triggers, tr)
	}
	return so
}

// required turns an unstructured.Nested* result into its value, failing the test when the
// field is missing or of another type.
func required[T any](t *testing.T, field string) func(T, bool, error) T {
	t.Helper()
	return func(v T, found bool, err error) T {
		t.Helper()
		if err != nil {
			t.Fatalf("%s: %s: %v", scaledObjectFile, field, err)
		}
		if !found {
			t.Fatalf("%s: %s is missing", scaledObjectFile, field)
		}
		return v
	}
}

// The cpu trigger adds nothing to what this test computes: it is a Resource metric the HPA
// evaluates from the pods' CPU usage against their request, not something KEDA reads.
func TestCPUTriggerIsAUtilizationTarget(t *testing.T) {
	so := loadScaledObject(t)
	var cpu []trigger
	for _, tr := range so.triggers {
		if tr.typ == cpuTrigger {
			cpu = append(cpu, tr)
		}
	}
	if len(cpu) != 1 {
		t.Fatalf("%s has %d cpu triggers, want 1", scaledObjectFile, len(cpu))
	}
	if got := cpu[0].metricType; got != string(autoscalingv2.UtilizationMetricType) {
		t.Errorf("cpu trigger metricType = %q, want %q", got, autoscalingv2.UtilizationMetricType)
	}
	if cpu[0].metadata["value"] == "" {
		t.Errorf("cpu trigger has no metadata.value (the target utilization)")
	}
}

// KEDA's own nats-jetstream scaler, built from each shipped trigger and pointed at a real
// nats-server holding the provisioned layout, reports what runs and what waits; the HPA KEDA
// creates then asks for the replica counts the ScaledObject's comments promise.
func TestShippedTriggersScaleTheFleet(t *testing.T) {
	so := loadScaledObject(t)
	for _, tr := range so.triggers {
		if tr.typ != natsJetStreamTrigger && tr.typ != cpuTrigger {
			t.Fatalf("%s: trigger %d is of type %q, which this test does not evaluate", scaledObjectFile, tr.index, tr.typ)
		}
	}
	for _, tc := range []struct {
		name            string
		running, queued int
		want            map[string]int64 // KEDA's metric value by trigger consumer
		wantReplicas    int64
	}{
		{
			// ceil(10,000 / 7,500) = 2, which is also the minimum.
			name: "10000 running, none queued", running: 10_000,
			want: map[string]int64{"runners": 10_000, "workers": 0}, wantReplicas: 2,
		},
		{
			name: "5000 queued, none running", queued: 5_000,
			want: map[string]int64{"runners": 0, "workers": 5_000}, wantReplicas: 5,
		},
		{
			// Three replicas' capacity (3 × 10,000), asked for with headroom:
			// ceil(30,000 / 7,500) = 4.
			name: "30000 running, none queued", running: 30_000,
			want: map[string]int64{"runners": 30_000, "workers": 0}, wantReplicas: 4,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
			defer cancel()
			f := newFleet(ctx, t)
			f.run(ctx, t, tc.running)
			f.queue(ctx, t, tc.queued)
			f.waitFor(ctx, t, tc.running, tc.queued)

			got := map[string]int64{}
			replicas := int64(0) // the HPA's desired count before its bounds
			for _, tr := range so.triggers {
				if tr.typ != natsJetStreamTrigger {
					continue
				}
				r := measure(ctx, t, so, tr, f.monitor)
				t.Logf("trigger %d %s/%s: value %d, target %d per replica: %d replicas",
					tr.index, tr.metadata["stream"], tr.metadata["consumer"], r.value, r.target, r.replicas)
				got[tr.metadata["consumer"]] = r.value
				replicas = max(replicas, r.replicas)
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("metric values by consumer (-want +got):\n%s", diff)
			}
			replicas = min(max(replicas, so.minReplicas), so.maxReplicas)
			if replicas != tc.wantReplicas {
				t.Errorf("%d running, %d queued: HPA asks for %d replicas, want %d",
					tc.running, tc.queued, replicas, tc.wantReplicas)
			}
		})
	}
}

// reading is one trigger's metric as KEDA serves it to the HPA.
type reading struct {
	value    int64 // the metric: the consumer's num_pending + num_ack_pending
	target   int64 // the AverageValue target: lagThreshold
	replicas int64 // what the HPA asks for on this metric alone
}

// measure builds KEDA's scaler for a shipped nats-jetstream trigger, as KEDA's scaler
// builder does, and reads its metric once. Only the endpoint and the account differ from the
// file: the test server's monitoring port, and "$G", the account of a server without
// accounts.
func measure(ctx context.Context, t *testing.T, so scaledObject, tr trigger, monitor string) reading {
	t.Helper()
	md := maps.Clone(tr.metadata)
	md["natsServerMonitoringEndpoint"] = monitor
	md["account"] = server.DEFAULT_GLOBAL_ACCOUNT
	metricType := autoscalingv2.MetricTargetType(tr.metricType)
	if metricType == "" {
		metricType = autoscalingv2.AverageValueMetricType // KEDA's default
	}
	s, err := scalers.NewNATSJetStreamScaler(&scalersconfig.ScalerConfig{
		ScalableObjectName:      so.name,
		ScalableObjectNamespace: so.namespace,
		ScalableObjectType:      "ScaledObject",
		TriggerType:             tr.typ,
		TriggerMetadata:         md,
		TriggerIndex:            tr.index,
		TriggerUniqueKey:        fmt.Sprintf("ScaledObject-%s-%s-%d", so.namespace, so.name, tr.index),
		ResolvedEnv:             map[string]string{},
		AuthParams:              map[string]string{},
		GlobalHTTPTimeout:       globalHTTPTimeout,
		MetricType:              metricType,
	})
	if err != nil {
		t.Fatalf("trigger %d: %v", tr.index, err)
	}
	defer func() {
		if err := s.Close(ctx); err != nil {
			t.Errorf("trigger %d: close scaler: %v", tr.index, err)
		}
	}()

	// The HPA asks KEDA's metrics server for the metric by the name in its spec.
	specs := s.GetMetricSpecForScaling(ctx)
	if len(specs) != 1 || specs[0].External == nil {
		t.Fatalf("trigger %d: metric specs %+v, want one External metric", tr.index, specs)
	}
	ext := specs[0].External
	if ext.Target.Type != autoscalingv2.AverageValueMetricType || ext.Target.AverageValue == nil {
		t.Fatalf("trigger %d: metric target %+v, want an AverageValue", tr.index, ext.Target)
	}
	values, _, err := s.GetMetricsAndActivity(ctx, ext.Metric.Name)
	if err != nil {
		t.Fatalf("trigger %d (%s/%s): %v", tr.index, md["stream"], md["consumer"], err)
	}
	if len(values) != 1 {
		t.Fatalf("trigger %d: %d metric values, want 1", tr.index, len(values))
	}
	// For an AverageValue external metric the HPA wants ceil(value / target) replicas,
	// whatever runs now (its 10% tolerance only keeps a count that is already close).
	// Milli-units, as both are served, keep the division exact.
	v, target := values[0].Value.MilliValue(), ext.Target.AverageValue.MilliValue()
	if target <= 0 {
		t.Fatalf("trigger %d: target %s, want > 0", tr.index, ext.Target.AverageValue)
	}
	return reading{value: v / 1000, target: target / 1000, replicas: (v + target - 1) / target}
}

// fleet is a nats-server with buildfleet's layout and no replica: what the test puts in the
// streams stays there.
type fleet struct {
	js      jetstream.JetStream
	layout  protocol.Layout
	res     queue.Provisioned
	monitor string // host:port of the server's HTTP monitoring (/jsz)
}

func newFleet(ctx context.Context, t *testing.T) *fleet {
	t.Helper()
	srv, err := server.NewServer(&server.Options{
		Host:      "127.0.0.1",
		Port:      server.RANDOM_PORT,
		HTTPHost:  "127.0.0.1",
		HTTPPort:  server.RANDOM_PORT,
		JetStream: true,
		StoreDir:  t.TempDir(),
		NoSigs:    true,
		NoLog:     true,
	})
	if err != nil {
		t.Fatal(err)
	}
	go srv.Start()
	t.Cleanup(func() {
		srv.Shutdown()
		srv.WaitForShutdown()
	})
	if !srv.ReadyForConnections(30 * time.Second) {
		t.Fatal("nats-server did not start")
	}
	mon := srv.MonitorAddr()
	if mon == nil {
		t.Fatal("nats-server has no monitoring listener")
	}
	nc, err := nats.Connect(srv.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc, jetstream.WithPublishAsyncMaxPending(4096))
	if err != nil {
		t.Fatal(err)
	}
	layout, err := protocol.NewLayout(protocol.DefaultPrefix)
	if err != nil {
		t.Fatal(err)
	}
	res, err := queue.Provision(ctx, js, queue.LayoutConfig{
		Layout: layout, Replicas: 1, DuplicateWindow: 20 * time.Minute, EventsMaxAge: time.Hour,
		DeadLetterMaxAge: time.Hour, RecordTTL: time.Hour, LivenessTTL: time.Minute,
		// Nothing is redelivered during the test, and the run consumer holds all it is
		// given, as deploy/base sets BUILDFLEET_MAX_ACK_PENDING.
		AckWait: 10 * time.Minute, MaxAckPending: 200_000,
	})
	if err != nil {
		t.Fatal(err)
	}
	return &fleet{js: js, layout: layout, res: res, monitor: mon.String()}
}

// run admits n builds, as the scheduler does, and holds them unacknowledged, as the
// replicas running them do: the run consumer then has n ack pending and none pending.
func (f *fleet) run(ctx context.Context, t *testing.T, n int) {
	t.Helper()
	targets, tenants := []string{"runc", "kata"}, []string{"team-a", "team-b", "team-c"}
	f.publish(ctx, t, n, func(i int) (*nats.Msg, string) {
		id := fmt.Sprintf("run-%05d", i)
		msg := nats.NewMsg(f.layout.RunSubject(targets[i%len(targets)], tenants[i%len(tenants)]))
		msg.Header.Set(protocol.HeaderBuild, id)
		msg.Data = []byte(`{}`)
		return msg, id
	})
	for held := 0; held < n; {
		batch, err := f.res.Runs.Fetch(min(n-held, 1000), jetstream.FetchMaxWait(5*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		got := 0
		for range batch.Messages() { // not acknowledged: each stays ack pending for AckWait
			got++
		}
		if err := batch.Error(); err != nil {
			t.Fatalf("fetch from %s: %v", f.layout.RunConsumer(), err)
		}
		if got == 0 {
			t.Fatalf("fetch from %s: nothing delivered after %d of %d", f.layout.RunConsumer(), held, n)
		}
		held += got
	}
}

// queue submits n build requests that no scheduler takes: the request consumer then has
// n pending.
func (f *fleet) queue(ctx context.Context, t *testing.T, n int) {
	t.Helper()
	f.publish(ctx, t, n, func(i int) (*nats.Msg, string) {
		req := protocol.BuildRequest{ID: fmt.Sprintf("req-%05d", i), Image: "busybox", Command: []string{"true"}, TimeoutSeconds: 60}
		data, err := json.Marshal(req)
		if err != nil {
			t.Fatal(err)
		}
		msg := nats.NewMsg(f.layout.RequestSubject(req.ID))
		msg.Data = data
		return msg, req.ID
	})
}

// publish stores n messages, each with its own Nats-Msg-Id, and waits for every ack.
func (f *fleet) publish(ctx context.Context, t *testing.T, n int, msg func(i int) (*nats.Msg, string)) {
	t.Helper()
	acks := make([]jetstream.PubAckFuture, 0, n)
	for i := range n {
		m, id := msg(i)
		a, err := f.js.PublishMsgAsync(m, jetstream.WithMsgID(id))
		if err != nil {
			t.Fatalf("publish %s: %v", m.Subject, err)
		}
		acks = append(acks, a)
	}
	select {
	case <-f.js.PublishAsyncComplete():
	case <-ctx.Done():
		t.Fatalf("publish %d messages: %v", n, ctx.Err())
	}
	for _, a := range acks {
		select {
		case pa := <-a.Ok():
			if pa.Duplicate {
				t.Fatalf("publish %s: stored as a duplicate", a.Msg().Subject)
			}
		case err := <-a.Err():
			t.Fatalf("publish %s: %v", a.Msg().Subject, err)
		}
	}
}

// waitFor waits until the server's consumers hold what KEDA should see: running builds ack
// pending on the run consumer, queued ones pending on the request consumer. /jsz reports the
// same consumer state the JetStream API does.
func (f *fleet) waitFor(ctx context.Context, t *testing.T, running, queued int) {
	t.Helper()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		runs, err := f.res.Runs.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		reqs, err := f.res.Requests.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		state := fmt.Sprintf("%s: %d pending, %d ack pending; %s: %d pending, %d ack pending",
			runs.Name, runs.NumPending, runs.NumAckPending, reqs.Name, reqs.NumPending, reqs.NumAckPending)
		if runs.NumAckPending == running && runs.NumPending == 0 && reqs.NumPending == uint64(queued) && reqs.NumAckPending == 0 {
			t.Log(state)
			return
		}
		select {
		case <-tick.C:
		case <-ctx.Done():
			t.Fatalf("waiting for %d running and %d queued: %v (%s)", running, queued, ctx.Err(), state)
		}
	}
}
