package kubetest

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"
)

// FaultOptions shape what a FaultProxy does to the requests it passes on.
type FaultOptions struct {
	// Rate is the share of requests answered with a fault (0.1: one in ten).
	Rate float64
	// Latency is the most a request is held before it is passed on; each is held a uniformly
	// drawn time below it.
	Latency time.Duration
	// Seed makes the draws repeatable.
	Seed uint64
}

// The faults a FaultProxy injects, as Counts names them.
const (
	// FaultThrottled is a 429 with Retry-After, as the apiserver's own priority and fairness
	// answers an overloaded client; client-go waits and tries again by itself.
	FaultThrottled = "429 throttled"
	// FaultUnavailable is a 503 before the request reaches the apiserver, as a load balancer
	// answers while no backend is healthy: nothing happened.
	FaultUnavailable = "503 before"
	// FaultLostResponse is a 500 in place of the apiserver's answer to a request it did carry
	// out (a create did create): the reply was lost on the way back. Watches are spared it.
	FaultLostResponse = "500 after"
)

// FaultProxy is an HTTPS reverse proxy before a kube-apiserver that answers a share of
// requests with 5xx or 429 and holds every request a random while: a flaky network and an
// overloaded apiserver, for the clients that go through it.
type FaultProxy struct {
	srv *httptest.Server
	o   FaultOptions

	mu     sync.Mutex
	rng    *rand.Rand
	counts map[string]int
	total  int
	posts  map[string]int // POST requests by the client connection (its address) they came over
}

type faultKey struct{}

// NewFaultProxy starts a proxy before the apiserver at upstream (https, its certificate not
// verified). Close stops it.
func NewFaultProxy(upstream string, o FaultOptions) (*FaultProxy, error) {
	u, err := url.Parse(upstream)
	if err != nil {
		return nil, fmt.Errorf("kubetest: fault proxy upstream %q: %w", upstream, err)
	}
	fp := &FaultProxy{o: o, rng: rand.New(rand.NewPCG(o.Seed, o.Seed^0x5bd1e995)), counts: map[string]int{}, posts: map[string]int{}}
	rp := httputil.NewSingleHostReverseProxy(u)
	rp.Transport = &http.Transport{
		TLSClientConfig:     &tls.Config{InsecureSkipVerify: true},
		MaxIdleConnsPerHost: 256,
		ForceAttemptHTTP2:   true,
	}
	rp.FlushInterval = -1 // watches stream
	rp.ModifyResponse = func(resp *http.Response) error {
		if resp.Request.Context().Value(faultKey{}) != FaultLostResponse {
			return nil
		}
		resp.Body.Close()
		writeStatus(resp, http.StatusInternalServerError, "injected: the apiserver's answer was lost")
		return nil
	}
	rp.ErrorHandler = func(w http.ResponseWriter, r *http.Request, err error) {
		// The upstream is down (an outage of its own): what a proxy answers then.
		http.Error(w, "upstream: "+err.Error(), http.StatusBadGateway)
	}
	fp.srv = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fault, hold := fp.draw(r)
		if hold > 0 {
			select {
			case <-time.After(hold):
			case <-r.Context().Done():
				return
			}
		}
		switch fault {
		case FaultThrottled:
			w.Header().Set("Retry-After", "1")
			statusBody(w, http.StatusTooManyRequests, "injected: too many requests, please try again later")
			return
		case FaultUnavailable:
			statusBody(w, http.StatusServiceUnavailable, "injected: service unavailable")
			return
		case FaultLostResponse:
			r = r.WithContext(context.WithValue(r.Context(), faultKey{}, FaultLostResponse))
		}
		rp.ServeHTTP(w, r)
	}))
	fp.srv.EnableHTTP2 = true
	fp.srv.StartTLS()
	return fp, nil
}

// draw decides a request's fault (none: "") and how long it is held.
func (fp *FaultProxy) draw(r *http.Request) (string, time.Duration) {
	watch := r.URL.Query().Get("watch") == "true" || r.URL.Query().Get("watch") == "1"
	fp.mu.Lock()
	defer fp.mu.Unlock()
	fp.total++
	if r.Method == http.MethodPost {
		fp.posts[r.RemoteAddr]++
	}
	var hold time.Duration
	if fp.o.Latency > 0 {
		hold = time.Duration(fp.rng.Int64N(int64(fp.o.Latency)))
	}
	if fp.rng.Float64() >= fp.o.Rate {
		return "", hold
	}
	faults := []string{FaultThrottled, FaultUnavailable, FaultLostResponse}
	if watch {
		faults = faults[:2]
	}
	fault := faults[fp.rng.IntN(len(faults))]
	fp.counts[fault]++
	return fault, hold
}

// URL is the proxy's address, for a kubeconfig.
func (fp *FaultProxy) URL() string { return fp.srv.URL }

// Counts are the faults injected so far by kind, and the requests seen ("requests").
func (fp *FaultProxy) Counts() map[string]int {
	fp.mu.Lock()
	defer fp.mu.Unlock()
	out := map[string]int{"requests": fp.total}
	for k, v := range fp.counts {
		out[k] = v
	}
	return out
}

// PostsByConn is how many POST requests (creates) came over each client connection, by the
// connection's address.
func (fp *FaultProxy) PostsByConn() map[string]int {
	fp.mu.Lock()
	defer fp.mu.Unlock()
	return maps.Clone(fp.posts)
}

// Close stops the proxy, cutting its open watches.
func (fp *FaultProxy) Close() {
	fp.srv.CloseClientConnections()
	fp.srv.Close()
}

// statusBody answers with a metav1.Status of code, as the apiserver words its errors.
func statusBody(w http.ResponseWriter, code int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_, _ = w.Write([]byte(status(code, msg)))
}

// writeStatus replaces resp with a metav1.Status of code.
func writeStatus(resp *http.Response, code int, msg string) {
	body := status(code, msg)
	resp.StatusCode = code
	resp.Status = strconv.Itoa(code) + " " + http.StatusText(code)
	resp.Header = http.Header{"Content-Type": {"application/json"}, "Content-Length": {strconv.Itoa(len(body))}}
	resp.ContentLength = int64(len(body))
	resp.Body = io.NopCloser(strings.NewReader(body))
}

func status(code int, msg string) string {
	reason := map[int]string{429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable"}[code]
	return fmt.Sprintf(`{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":%q,"reason":%q,"code":%d}`, msg, reason, code)
}
