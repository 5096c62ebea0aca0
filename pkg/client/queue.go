package client

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// ErrNoReplica is returned by Queue when no replica answered.
var ErrNoReplica = errors.New("no replica answered")

// Queue asks every replica what it holds waiting, with up to head builds of each tenant, and
// returns the answers gathered until wait has passed. Only the scheduling replica holds
// waiting builds; every replica reports the fleet's running builds.
func (c *Client) Queue(ctx context.Context, head int, wait time.Duration) ([]protocol.QueueStatus, error) {
	nc := c.js.Conn()
	inbox := nats.NewInbox()
	sub, err := nc.SubscribeSync(inbox)
	if err != nil {
		return nil, fmt.Errorf("queue: %w", err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	body := fmt.Appendf(nil, `{"head":%d}`, head)
	if err := nc.PublishRequest(c.layout.QueueStatusSubject(), inbox, body); err != nil {
		return nil, fmt.Errorf("queue: %w", err)
	}
	wctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	var out []protocol.QueueStatus
	for {
		msg, err := sub.NextMsgWithContext(wctx)
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			break // wait has passed
		}
		var st protocol.QueueStatus
		if err := json.Unmarshal(msg.Data, &st); err != nil {
			return nil, fmt.Errorf("queue: an answer that is not a queue status: %w", err)
		}
		out = append(out, st)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%w within %s on %s (is the fleet running?)", ErrNoReplica, wait, c.layout.QueueStatusSubject())
	}
	return out, nil
}
