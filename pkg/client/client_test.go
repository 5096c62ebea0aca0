package client_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/buildfleet/buildfleet/internal/natstest"
	"github.com/buildfleet/buildfleet/internal/queue"
	"github.com/buildfleet/buildfleet/pkg/client"
	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// newClient provisions the layout on a real nats-server, as a worker would, with no worker
// consuming: what the client writes stays where it put it.
func newClient(t *testing.T) (*client.Client, jetstream.JetStream) {
	t.Helper()
	nc := natstest.Connect(t, natstest.Start(t))
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	layout, _ := protocol.NewLayout(protocol.DefaultPrefix)
	if _, err := queue.Provision(context.Background(), js, queue.LayoutConfig{
		Layout: layout, DuplicateWindow: time.Minute, EventsMaxAge: time.Hour, DeadLetterMaxAge: time.Hour,
		RecordTTL: time.Hour, AckWait: 5 * time.Second, MaxAckPending: 10,
	}); err != nil {
		t.Fatal(err)
	}
	cl, err := client.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return cl, js
}

func TestSubmitQueuesOnceAndRecords(t *testing.T) {
	cl, js := newClient(t)
	ctx := context.Background()
	req := protocol.BuildRequest{ID: "c1", Image: "busybox", Command: []string{"true"}, TimeoutSeconds: 30}
	for i, wantDup := range []bool{false, true, true} {
		res, err := cl.Submit(ctx, req)
		if err != nil {
			t.Fatalf("Submit #%d: %v", i, err)
		}
		if res.Duplicate != wantDup {
			t.Errorf("Submit #%d Duplicate = %v, want %v", i, res.Duplicate, wantDup)
		}
	}
	st, err := js.Stream(ctx, "BUILDFLEET_REQUESTS")
	if err != nil {
		t.Fatal(err)
	}
	if n := st.CachedInfo().State.Msgs; n != 1 {
		t.Errorf("%d requests queued, want 1", n)
	}
	rec, err := cl.Status(ctx, "c1")
	if err != nil || rec.State != protocol.StateQueued || rec.TimeoutSeconds != 30 {
		t.Errorf("Status = %+v, %v; want queued with the request's timeout", rec, err)
	}
	if _, err := cl.Status(ctx, "c2"); !errors.Is(err, client.ErrNotFound) {
		t.Errorf("Status of an unknown build = %v, want ErrNotFound", err)
	}
}

func TestWatchOneReplaysAndAllFollows(t *testing.T) {
	cl, _ := newClient(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := cl.Submit(ctx, protocol.BuildRequest{ID: "w1", Image: "busybox", Command: []string{"true"}}); err != nil {
		t.Fatal(err)
	}
	// Watching one build replays from its start: the queued event published before we watched.
	for ev, err := range cl.Watch(ctx, "w1") {
		if err != nil {
			t.Fatal(err)
		}
		if ev.Data.State != protocol.StateQueued || ev.Subject != "w1" {
			t.Errorf("first event = %s of %s, want queued of w1", ev.Data.State, ev.Subject)
		}
		break
	}
	// Watching all builds follows new events only, unless FromStart.
	got := make(chan protocol.Event, 4)
	wctx, wcancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() {
		for ev, err := range cl.Watch(wctx, "") {
			if err != nil {
				done <- err
				return
			}
			got <- ev
		}
		done <- nil
	}()
	time.Sleep(200 * time.Millisecond) // let the watch start before the next submit
	if _, err := cl.Submit(ctx, protocol.BuildRequest{ID: "w2", Image: "busybox", Command: []string{"true"}}); err != nil {
		t.Fatal(err)
	}
	select {
	case ev := <-got:
		if ev.Subject != "w2" {
			t.Errorf("watch-all's first event is for %s, want w2 (w1's is older)", ev.Subject)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("watch-all saw no event")
	}
	wcancel()
	if err := <-done; err != nil && !errors.Is(err, context.Canceled) {
		t.Errorf("watch-all ended with %v", err)
	}
	n := 0
	for _, err := range cl.Watch(ctx, "", client.FromStart()) {
		if err != nil {
			t.Fatal(err)
		}
		if n++; n == 2 {
			break
		}
	}
	if n != 2 {
		t.Errorf("FromStart replayed %d events, want 2", n)
	}
}

func TestStopAndSubmitValidate(t *testing.T) {
	cl, _ := newClient(t)
	ctx := context.Background()
	var verr *protocol.ValidationError
	if err := cl.Stop(ctx, "UPPER", ""); !errors.As(err, &verr) {
		t.Errorf("Stop with a bad id = %v, want a ValidationError", err)
	}
	if _, err := cl.Submit(ctx, protocol.BuildRequest{ID: "ok", Image: "busybox"}); !errors.As(err, &verr) {
		t.Errorf("Submit without a command = %v, want a ValidationError", err)
	}
	if err := cl.Stop(ctx, "ok", "why not"); err != nil {
		t.Errorf("Stop: %v", err)
	}
}

func TestSubmitRefusesOversizeRequest(t *testing.T) {
	cl, js := newClient(t)
	big := make([]byte, protocol.MaxMessageBytes)
	for i := range big {
		big[i] = 'x'
	}
	_, err := cl.Submit(context.Background(), protocol.BuildRequest{ID: "huge", Image: "busybox",
		Command: []string{"true"}, Env: map[string]string{"BIG": string(big)}})
	var verr *protocol.ValidationError
	if !errors.As(err, &verr) {
		t.Fatalf("Submit of a request over %d bytes = %v; want a ValidationError", protocol.MaxMessageBytes, err)
	}
	if _, err := cl.Status(context.Background(), "huge"); !errors.Is(err, client.ErrNotFound) {
		t.Errorf("an oversize request left a record behind: %v", err)
	}
	st, _ := js.Stream(context.Background(), "BUILDFLEET_REQUESTS")
	if n := st.CachedInfo().State.Msgs; n != 0 {
		t.Errorf("%d requests queued, want 0", n)
	}
}
