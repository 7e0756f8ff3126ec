// Package devredis finds a Redis for development: the one on
// 127.0.0.1:6379 if it answers, otherwise an embedded miniredis on that
// address. Never used when REDIS_URL (or production mode) is set.
package devredis

import (
	"bufio"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"time"

	"github.com/alicebob/miniredis/v2"
)

// Addr is where development looks for, or starts, a Redis
// (config.DefaultRedisURL).
const Addr = "127.0.0.1:6379"

// Resolve returns the URL of a Redis at addr (Addr in serve) and, when it
// had to start one, the embedded server, which the caller closes. The
// embedded server speaks RESP2 only.
func Resolve(addr string, log *slog.Logger) (url string, embedded *miniredis.Miniredis, err error) {
	url = "redis://" + addr
	if answers(addr) {
		log.Info("development: using the Redis on " + addr)
		return url, nil, nil
	}
	m := miniredis.NewMiniRedis()
	if err := m.StartAddr(addr); err != nil {
		return "", nil, fmt.Errorf("devredis: no Redis answers on %s and the embedded one cannot start: %w", addr, err)
	}
	log.Warn("DEVELOPMENT ONLY: started an embedded Redis-protocol server (miniredis) on " + addr +
		"; set REDIS_URL to use a real Redis")
	return url, m, nil
}

// answers reports whether a Redis replies to PING at addr.
func answers(addr string) bool {
	c, err := net.DialTimeout("tcp", addr, 300*time.Millisecond)
	if err != nil {
		return false
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(500 * time.Millisecond))
	if _, err := c.Write([]byte("*1\r\n$4\r\nPING\r\n")); err != nil {
		return false
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	return err == nil && strings.HasPrefix(line, "+PONG")
}
