package cli

import (
	"fmt"
	"testing"
	"time"

	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// BenchmarkBuildRoundTrip measures one build of `true` through a real nats-server and one
// replica with the process executor: Submit → queued → dispatched → running → succeeded.
func BenchmarkBuildRoundTrip(b *testing.B) {
	f := newFleet(b)
	f.start(f.settings("a"), nil)
	b.ResetTimer()
	for i := range b.N {
		id := fmt.Sprintf("bench-%d", i)
		f.submit(id, "true")
		evs := f.await(id, 30*time.Second)
		if evs[len(evs)-1].Data.State != protocol.StateSucceeded {
			b.Fatalf("%s: %v", id, states(evs))
		}
	}
}

// BenchmarkThroughput submits b.N builds of `true` at once and waits for all of them.
func BenchmarkThroughput(b *testing.B) {
	f := newFleet(b)
	f.start(f.settings("a"), nil)
	b.ResetTimer()
	for i := range b.N {
		f.submit(fmt.Sprintf("tp-%d", i), "true")
	}
	waitFor(b, 5*time.Minute, "every build finished", func() bool {
		return f.pending("BUILDFLEET_REQUESTS") == 0
	})
}
