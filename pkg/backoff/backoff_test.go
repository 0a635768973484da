package backoff

import (
	"context"
	"testing"
	"testing/synctest"
	"time"
)

func TestDelay(t *testing.T) {
	const ms = time.Millisecond
	tests := []struct {
		name string
		b    Backoff
		want []time.Duration // after 1, 2, 3… failures
	}{
		// The agent's reconcile loop: per component, 100ms doubling to 30s.
		{"reconcile", Backoff{Base: 100 * ms, Max: 30 * time.Second},
			[]time.Duration{100 * ms, 200 * ms, 400 * ms, 800 * ms, 1600 * ms, 3200 * ms, 6400 * ms, 12800 * ms, 25600 * ms, 30 * time.Second, 30 * time.Second}},
		// Registration and the registry watcher's default: 100ms doubling
		// to 250ms (etcdclient.RetryMax).
		{"registration", Backoff{Base: 100 * ms, Max: 250 * ms},
			[]time.Duration{100 * ms, 200 * ms, 250 * ms, 250 * ms}},
		// A longer cap.
		{"one second cap", Backoff{Base: 100 * ms, Max: time.Second},
			[]time.Duration{100 * ms, 200 * ms, 400 * ms, 800 * ms, time.Second}},
		{"max below base", Backoff{Base: 100 * ms, Max: 10 * ms},
			[]time.Duration{10 * ms, 10 * ms}},
		{"no max", Backoff{Base: time.Second},
			[]time.Duration{time.Second, time.Second}},
		{"no base", Backoff{Max: time.Second}, []time.Duration{0, 0}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for i, want := range tt.want {
				if got := tt.b.Delay(i + 1); got != want {
					t.Errorf("Delay(%d) = %v, want %v", i+1, got, want)
				}
				if got := tt.b.Fail(); got != want {
					t.Errorf("Fail() #%d = %v, want %v", i+1, got, want)
				}
			}
			if got := tt.b.Failures(); got != len(tt.want) {
				t.Errorf("Failures() = %d, want %d", got, len(tt.want))
			}
			tt.b.Reset()
			if got := tt.b.Failures(); got != 0 {
				t.Errorf("after Reset, Failures() = %d", got)
			}
			if got, want := tt.b.Fail(), tt.b.Delay(1); got != want {
				t.Errorf("after Reset, Fail() = %v, want the first delay %v", got, want)
			}
		})
	}
	if got := (&Backoff{Base: time.Second, Max: time.Second}).Delay(0); got != 0 {
		t.Errorf("Delay(0) = %v, want 0", got)
	}
	// A huge failure count stops doubling at the cap instead of overflowing.
	if got := (&Backoff{Base: time.Nanosecond, Max: time.Hour}).Delay(1 << 20); got != time.Hour {
		t.Errorf("Delay(1<<20) = %v, want 1h", got)
	}
}

func TestFailJitter(t *testing.T) {
	b := Backoff{Base: 100 * time.Millisecond, Max: time.Second, Jitter: true}
	seen := map[time.Duration]bool{}
	for n := 1; n <= 200; n++ {
		full := b.Delay(n)
		d := b.Fail()
		if d < full/2 || d > full {
			t.Fatalf("failure %d: jittered delay %v outside [%v, %v]", n, d, full/2, full)
		}
		seen[d] = true
	}
	if len(seen) < 10 {
		t.Errorf("jitter gave only %d distinct delays in 200 failures", len(seen))
	}
}

func TestWait(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := Backoff{Base: 100 * time.Millisecond, Max: time.Second}
		for _, want := range []time.Duration{100 * time.Millisecond, 200 * time.Millisecond, 400 * time.Millisecond} {
			start := time.Now()
			b.Wait(t.Context())
			if got := time.Since(start); got != want {
				t.Errorf("Wait slept %v, want %v", got, want)
			}
		}
		// A context that ends cuts the wait short.
		ctx, cancel := context.WithCancel(t.Context())
		start := time.Now()
		go func() {
			time.Sleep(50 * time.Millisecond)
			cancel()
		}()
		b.Wait(ctx)
		if got := time.Since(start); got != 50*time.Millisecond {
			t.Errorf("Wait with a context cancelled after 50ms returned after %v", got)
		}
		if b.Failures() != 4 {
			t.Errorf("Failures() = %d, want 4", b.Failures())
		}
	})
}

// TestNextAsBound: used as an attempt's bound, Next starts at Base,
// doubles with each attempt that ran out of it, stops at Max and starts
// over after a success.
func TestNextAsBound(t *testing.T) {
	b := Backoff{Base: 10 * time.Second, Max: 2 * time.Minute}
	var got []time.Duration
	for range 6 {
		got = append(got, b.Next())
		b.Fail()
	}
	want := []time.Duration{10 * time.Second, 20 * time.Second, 40 * time.Second, 80 * time.Second, 2 * time.Minute, 2 * time.Minute}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("bounds %v, want %v", got, want)
		}
	}
	b.Reset()
	if n := b.Next(); n != 10*time.Second {
		t.Errorf("after a success the bound is %v, want 10s", n)
	}
}
