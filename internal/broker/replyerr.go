package broker

import (
	"context"
	"errors"
	"math/rand/v2"
	"strings"
	"time"

	"github.com/redis/rueidis"
)

// Redis error replies, classified in one place.

// waitPrefixes are the error replies of a Redis that is there but cannot
// serve the command yet: loading its data set after a restart (LOADING), running
// a long script (BUSY), a slot being migrated (TRYAGAIN), a replica whose
// master is down (MASTERDOWN) or a cluster failing over (CLUSTERDOWN).
// They are a wait, not a verdict: the same command succeeds later.
var waitPrefixes = []string{"LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN", "CLUSTERDOWN"}

// IsWait reports whether err is a Redis reply that means "not now, retry":
// see waitPrefixes.
func IsWait(err error) bool {
	var re *rueidis.RedisError
	if err == nil || !errors.As(err, &re) {
		return false
	}
	msg := re.Error()
	for _, p := range waitPrefixes {
		if msg == p || strings.HasPrefix(msg, p+" ") {
			return true
		}
	}
	return false
}

// isRedirect reports a reply that says the slot is served elsewhere.
func isRedirect(err error) bool {
	return strings.HasPrefix(err.Error(), "MOVED") || strings.Contains(err.Error(), "CROSSSLOT")
}

// waitBackoff is the pause before asking a waiting Redis again: 20ms·2^n up
// to 500ms, with jitter. A load of seconds is polled a few times a second,
// so the link comes back soon after the load ends.
func waitBackoff(attempt int) time.Duration {
	ceil := 20 * time.Millisecond << min(attempt, 5)
	ceil = min(ceil, 500*time.Millisecond)
	return ceil/2 + rand.N(ceil/2+1)
}

// retryDelay is the pause before reconnecting a link after err.
func retryDelay(attempt int, err error) time.Duration {
	if IsWait(err) {
		return waitBackoff(attempt)
	}
	return backoff(attempt)
}

// errNotReadable wraps the reply of a node that cannot serve reads yet.
var errNotReadable = errors.New("redis cannot serve reads yet")

// readable asks c (every node of a cluster client) for a read (DBSIZE: no
// key, O(1), refused with LOADING while the data set loads), once more when
// the connection failed (a pooled connection that died with the server
// fails once), and returns an error wrapping the reply when a node answers
// with a wait reply (IsWait), or cannot be reached at all unless it is one
// node of many (a failed cluster node may still be listed: the links and
// reads judge it). It is what "the link is up" waits for: the repair that
// follows reads history.
func readable(ctx context.Context, c rueidis.Client) error {
	nodes := map[string]rueidis.Client{"": c}
	if all := c.Nodes(); len(all) > 1 {
		nodes = all
	}
	for _, n := range nodes {
		res := retryBroken(ctx, 1, func([]int) []rueidis.RedisResult {
			return []rueidis.RedisResult{n.Do(ctx, n.B().Dbsize().Build())}
		})[0]
		switch err := res.Error(); {
		case IsWait(err):
			return errors.Join(errNotReadable, err)
		case res.NonRedisError() != nil && len(nodes) == 1:
			return err
		}
	}
	return nil
}

// retryWaits runs the commands 0..n-1 with run (given the indexes to run,
// it returns their results in that order) and runs again, within ctx, those
// whose reply was a wait (IsWait), with waitBackoff between rounds; a
// command whose connection failed (a restart: the pooled connection died
// with the server) is run again once, at once. It returns the last result
// of each.
func retryWaits(ctx context.Context, n int, run func(idx []int) []rueidis.RedisResult) []rueidis.RedisResult {
	return retry(ctx, n, true, run)
}

// retryBroken is retryWaits without waiting: only a command whose
// connection failed is run again, once.
func retryBroken(ctx context.Context, n int, run func(idx []int) []rueidis.RedisResult) []rueidis.RedisResult {
	return retry(ctx, n, false, run)
}

func retry(ctx context.Context, n int, waits bool, run func(idx []int) []rueidis.RedisResult) []rueidis.RedisResult {
	all := make([]int, n)
	for i := range all {
		all[i] = i
	}
	results := run(all)
	for round := 0; ; round++ {
		var again []int
		waiting := false
		for i, res := range results {
			switch err := res.Error(); {
			case waits && IsWait(err):
				again, waiting = append(again, i), true
			case round == 0 && res.NonRedisError() != nil:
				again = append(again, i)
			}
		}
		if len(again) == 0 || ctx.Err() != nil {
			return results
		}
		if waiting {
			t := time.NewTimer(waitBackoff(round))
			select {
			case <-ctx.Done():
				t.Stop()
				return results
			case <-t.C:
			}
		}
		for j, res := range run(again) {
			results[again[j]] = res
		}
	}
}
