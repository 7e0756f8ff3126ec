package broker

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/redis/rueidis"

	"github.com/huleedu/websocket-service/notify"
)

// Why a replay could not be complete: the reasons of resume.incomplete.
const (
	ReasonTrimmed     = "trimmed"     // older than the retained window
	ReasonReset       = "reset"       // history lost or recreated: another epoch
	ReasonAhead       = "ahead"       // since is beyond the newest id
	ReasonRollback    = "rollback"    // the entry at since's offset is another one: a failover lost the tail
	ReasonInvalid     = "invalid"     // since cannot be parsed
	ReasonUnavailable = "unavailable" // Redis could not be read
)

// readScript reads a history and its metadata at one instant, from since's
// entry on: ARGV[1] is since's epoch ("": the reader had none, everything
// is new), ARGV[2] its offset. Offsets are contiguous in the list, so
// since's entry is newest-since+1 from the end (decide needs it to detect a
// rollback; a shorter list is read whole and found trimmed). Another epoch,
// or since at or beyond the newest, reads the newest entry only (its check).
// A caught-up reader costs one entry, not the whole retained list.
const readScript = `local m = redis.call('HMGET', KEYS[2], 'e', 'o')
local from, newest = 0, tonumber(m[2])
if ARGV[1] ~= '' and m[1] and newest then
  if m[1] ~= ARGV[1] then
    from = -1
  else
    from = -math.max(1, newest - tonumber(ARGV[2]) + 1)
  end
end
return {m, redis.call('LRANGE', KEYS[1], from, -1)}`

// History reads the per-user histories notify's publish.lua writes, over a
// command connection of its own (a cluster client routes each read to the
// slot owner). It is the read side of the history seam; the hub and the
// gateway never see Redis keys.
type History struct {
	prefix    string
	clientOpt rueidis.ClientOption
	script    *rueidis.Lua

	mu     sync.Mutex
	client rueidis.Client // dialled on first use: Redis may be down at start
}

// NewHistory prepares a reader for the same Redis as a broker with opts.
func NewHistory(opts RedisOptions) (*History, error) {
	opts, co, err := opts.prepare()
	if err != nil {
		return nil, err
	}
	co.BlockingPoolSize = 0
	co.ClientName = opts.ClientName
	return &History{prefix: opts.Prefix, clientOpt: co, script: rueidis.NewLuaScript(readScript)}, nil
}

// Close releases the connection.
func (h *History) Close() {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.client != nil {
		h.client.Close()
		h.client = nil
	}
}

func (h *History) conn() (rueidis.Client, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.client == nil {
		opt := h.clientOpt
		opt.InitAddress = slices.Clone(opt.InitAddress)
		c, err := rueidis.NewClient(opt)
		if err != nil {
			return nil, err
		}
		h.client = c
	}
	return h.client, nil
}

// Replay is what a reader missed after since.
type Replay struct {
	// Entries are the stored payloads after since, oldest first,
	// byte-identical to what was published live. Empty when Reason is set.
	Entries [][]byte
	// Last is the id the reader is complete up to: since, or the last entry.
	Last notify.ID
	// Reason is "" when Entries are complete, else one of the Reason values.
	Reason string
	// Newest is the newest id the history holds (zero: none; Check "" when
	// its entry expired), known unless Reason is invalid or unavailable:
	// where a reader whose replay was incomplete starts again.
	Newest notify.ID
}

// Since returns what topic's history holds after since, as a client sent it.
func (h *History) Since(ctx context.Context, topic, since string) Replay {
	id, ok := notify.ParseID(since)
	if since == notify.EmptyPosition {
		id, ok = notify.ID{}, true
	}
	if !ok {
		return Replay{Reason: ReasonInvalid}
	}
	return h.SinceMany(ctx, []string{topic}, []notify.ID{id})[0]
}

// SinceMany reads many histories in one pipeline (one round trip per node).
// A zero id means "the history was empty": everything it holds now is new.
func (h *History) SinceMany(ctx context.Context, topics []string, since []notify.ID) []Replay {
	out := make([]Replay, len(topics))
	execs := make([]rueidis.LuaExec, len(topics))
	for i, t := range topics {
		out[i].Last = since[i]
		ch := notify.Channel(h.prefix, t)
		execs[i] = rueidis.LuaExec{Keys: []string{notify.HistoryKey(ch), notify.MetaKey(ch)},
			Args: []string{since[i].Epoch, strconv.FormatInt(since[i].Offset, 10)}}
	}
	if len(execs) == 0 {
		return out
	}
	c, err := h.conn()
	if err != nil {
		for i := range out {
			out[i].Reason = ReasonUnavailable
		}
		return out
	}
	// A connection that died with the server (a restart) fails its next
	// commands once, and a Redis still loading its data answers LOADING:
	// scripts are not retried by the client, so retryWaits does (within ctx).
	results := retryWaits(ctx, len(execs), func(idx []int) []rueidis.RedisResult {
		run := make([]rueidis.LuaExec, len(idx))
		for j, i := range idx {
			run[j] = execs[i]
		}
		return h.script.ExecMulti(ctx, c, run...)
	})
	for i, res := range results {
		if err := decide(&out[i], res); err != nil {
			out[i] = Replay{Last: since[i], Reason: ReasonUnavailable}
		}
	}
	return out
}

// Newest returns the id of the newest notification in topic's history, or
// the zero id when there is none: where a new connection starts.
func (h *History) Newest(ctx context.Context, topic string) (notify.ID, error) {
	c, err := h.conn()
	if err != nil {
		return notify.ID{}, err
	}
	ch := notify.Channel(h.prefix, topic)
	res := retryWaits(ctx, 2, func(idx []int) []rueidis.RedisResult {
		cmds := make(rueidis.Commands, len(idx))
		for j, i := range idx {
			if i == 0 {
				cmds[j] = c.B().Hmget().Key(notify.MetaKey(ch)).Field("e", "o").Build()
			} else {
				cmds[j] = c.B().Lindex().Key(notify.HistoryKey(ch)).Index(-1).Build()
			}
		}
		return c.DoMulti(ctx, cmds...)
	})
	meta, err := res[0].ToArray()
	if err != nil || len(meta) != 2 {
		return notify.ID{}, fmt.Errorf("read history meta: %w", err)
	}
	epoch, _ := meta[0].ToString()
	offset, _ := meta[1].AsInt64()
	if epoch == "" || offset < 1 {
		return notify.ID{}, nil
	}
	id := notify.ID{Epoch: epoch, Offset: offset} // Check "": not known (the entry expired)
	if tail, err := res[1].ToString(); err == nil {
		if off, check, _, err := splitEntry(tail); err == nil && off == offset {
			id.Check = check
		}
	} else if !rueidis.IsRedisNil(err) {
		return notify.ID{}, fmt.Errorf("read history: %w", err)
	}
	return id, nil
}

// errBadHistory marks a history this reader cannot parse.
var errBadHistory = errors.New("malformed history entry")

// decide compares since (r.Last) with the history read and fills r.
func decide(r *Replay, res rueidis.RedisResult) error {
	v, err := res.ToArray()
	if err != nil || len(v) != 2 {
		return fmt.Errorf("read history: %w", err)
	}
	meta, err := v[0].ToArray()
	if err != nil || len(meta) != 2 {
		return fmt.Errorf("read history meta: %w", err)
	}
	list, err := v[1].AsStrSlice()
	if err != nil {
		return fmt.Errorf("read history list: %w", err)
	}
	epoch, _ := meta[0].ToString()
	newest, _ := meta[1].AsInt64()
	if epoch != "" && newest > 0 {
		r.Newest = notify.ID{Epoch: epoch, Offset: newest}
		if n := len(list); n > 0 {
			if off, check, _, err := splitEntry(list[n-1]); err == nil && off == newest {
				r.Newest.Check = check
			}
		}
	}
	since := r.Last
	if since.Epoch == "" { // empty when the reader started: all of this epoch is new
		if epoch == "" {
			return nil
		}
		since = notify.ID{Epoch: epoch}
	}
	switch {
	case epoch == "" || epoch != since.Epoch:
		r.Reason = ReasonReset
		return nil
	case since.Offset > newest:
		r.Reason = ReasonAhead
		return nil
	case since.Offset == newest:
		// Up to date, unless the newest entry is another one than since's.
		// (With the list expired by age there is nothing to compare, and
		// nothing new either.)
		if n := len(list); n > 0 {
			if off, check, _, err := splitEntry(list[n-1]); err == nil && off == newest && since.Check != "" && check != since.Check {
				r.Reason = ReasonRollback
			}
		}
		return nil
	}
	for i, e := range list {
		off, check, payload, err := splitEntry(e)
		if err != nil {
			return err
		}
		switch {
		case off < since.Offset:
			continue
		case off == since.Offset:
			if since.Check != "" && check != since.Check { // "": a position whose entry had expired
				r.Reason = ReasonRollback
				return nil
			}
			continue
		case i == 0 && off > since.Offset+1:
			r.Reason = ReasonTrimmed
			return nil
		}
		r.Entries = append(r.Entries, []byte(payload))
		r.Last = notify.ID{Epoch: epoch, Offset: off, Check: check}
	}
	if len(list) == 0 || r.Last.Offset < newest {
		// Expired by age (nothing left), or entries missing at the end.
		r.Entries, r.Last, r.Reason = nil, since, ReasonTrimmed
	}
	return nil
}

// splitEntry parses "<offset>|<ms>|<check>|<json>".
func splitEntry(e string) (offset int64, check, payload string, err error) {
	parts := strings.SplitN(e, "|", 4)
	if len(parts) != 4 {
		return 0, "", "", errBadHistory
	}
	offset, err = strconv.ParseInt(parts[0], 10, 64)
	if err != nil {
		return 0, "", "", errBadHistory
	}
	return offset, parts[2], parts[3], nil
}

// Publish stores payload in the user's history and sends it, as
// notify.HistoryPublisher does, over this reader's connection (the
// development demo page publishes through it).
func (h *History) Publish(ctx context.Context, userID string, payload []byte, sharded bool) (notify.Published, error) {
	c, err := h.conn()
	if err != nil {
		return notify.Published{}, err
	}
	return notify.NewHistoryPublisher(c, h.prefix, sharded, notify.HistoryOptions{}).Publish(ctx, userID, payload, "")
}

// RevokedAt returns, for each user, the time (unix seconds) up to which the
// user's tokens are revoked (notify.Disconnect with Revoke), 0 when none, in
// one pipeline. It reads beside the history because it lives in the same
// slot and the same failure domain.
func (h *History) RevokedAt(ctx context.Context, users []string) ([]int64, error) {
	c, err := h.conn()
	if err != nil {
		return nil, err
	}
	// A connection that died with the server (or was cut) fails its next
	// command once: retry that. A wait reply (a Redis loading) is not
	// waited for here: a handshake must not stall on it.
	results := retryBroken(ctx, len(users), func(idx []int) []rueidis.RedisResult {
		cmds := make(rueidis.Commands, len(idx))
		for j, i := range idx {
			cmds[j] = c.B().Get().Key(notify.RevocationKey(notify.Channel(h.prefix, users[i]))).Build()
		}
		return c.DoMulti(ctx, cmds...)
	})
	out := make([]int64, len(users))
	for i, res := range results {
		n, err := res.AsInt64()
		if rueidis.IsRedisNil(err) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("read revocation: %w", err)
		}
		out[i] = n
	}
	return out, nil
}
