package bench

import (
	"context"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/backoff"
)

// watchResuming watches prefix through cli until ctx ends, resuming as
// meshd's registry.Watcher resumes: the first stream opens at etcd's head
// (with the creation notice if created), and a stream that ends is opened
// again from the revision after the last one it reported, after meshd's
// retry wait, so no event is lost, only delayed. Streams do end under
// load: etcd's gRPC proxy cancels a client's whole watch stream when it
// cannot queue a response for it within 50 ms (grpcproxy's
// watcher.post), and the client reports that as its own cancellation and
// closes the channel. A harness watcher that stopped there waited forever
// for events meshd would have had after one retry. fn gets every
// response; resumed, if set, is called on each resumption.
func watchResuming(ctx context.Context, cli clientv3.Watcher, prefix string, created bool, fn func(clientv3.WatchResponse), resumed func()) {
	retry := backoff.Backoff{Base: 100 * time.Millisecond, Max: 250 * time.Millisecond, Jitter: true}
	var next int64 // revision to resume from; 0: etcd's head
	for first := true; ctx.Err() == nil; first = false {
		if !first {
			if resumed != nil {
				resumed()
			}
			retry.Wait(ctx)
		}
		opts := []clientv3.OpOption{clientv3.WithPrefix()}
		switch {
		case next != 0:
			opts = append(opts, clientv3.WithRev(next))
		case created:
			opts = append(opts, clientv3.WithCreatedNotify())
		}
		sctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
		for wr := range cli.Watch(sctx, prefix, opts...) {
			if wr.CompactRevision != 0 {
				next = 0 // from the head again, as a relisting node would
			}
			if wr.Err() != nil {
				break
			}
			retry.Reset()
			if wr.Header.Revision >= next {
				next = wr.Header.Revision + 1
			}
			fn(wr)
		}
		cancel() // the stream, if it ended on an error and is still open
	}
}
