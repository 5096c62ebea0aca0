package queue_test

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/buildfleet/buildfleet/internal/natstest"
	"github.com/buildfleet/buildfleet/internal/queue"
	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// The liveness TTL is raised in place but never lowered under a running fleet, whose
// replicas computed their deadlines from it; the record TTL follows the settings both ways.
func TestProvisionNeverLowersTheLivenessTTL(t *testing.T) {
	js, err := jetstream.New(natstest.Connect(t, natstest.Start(t)))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	layout, _ := protocol.NewLayout(protocol.DefaultPrefix)
	cfg := queue.LayoutConfig{Layout: layout, Replicas: 1, DuplicateWindow: time.Minute, EventsMaxAge: time.Hour,
		DeadLetterMaxAge: time.Hour, RecordTTL: 2 * time.Hour, LivenessTTL: 30 * time.Second, AckWait: 2 * time.Second, MaxAckPending: 10}
	ttls := func() (records, liveness time.Duration) {
		t.Helper()
		p, err := queue.Provision(ctx, js, cfg)
		if err != nil {
			t.Fatal(err)
		}
		rs, err := p.Records.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		ls, err := p.Replicas.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return rs.TTL(), ls.TTL()
	}
	for _, step := range []struct {
		records, liveness         time.Duration // asked for
		wantRecords, wantLiveness time.Duration
	}{
		{2 * time.Hour, 30 * time.Second, 2 * time.Hour, 30 * time.Second},
		{time.Hour, 10 * time.Second, time.Hour, 30 * time.Second}, // lowered: the liveness TTL stays
		{3 * time.Hour, time.Minute, 3 * time.Hour, time.Minute},   // raised: both follow
	} {
		cfg.RecordTTL, cfg.LivenessTTL = step.records, step.liveness
		if r, l := ttls(); r != step.wantRecords || l != step.wantLiveness {
			t.Errorf("provisioned with record TTL %s, liveness TTL %s: buckets have %s, %s; want %s, %s",
				step.records, step.liveness, r, l, step.wantRecords, step.wantLiveness)
		}
	}
}
