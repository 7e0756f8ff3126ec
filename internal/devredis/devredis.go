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

	"github.com/huleedu/websocket-service/internal/config"
)

// Addr is where development looks for, or starts, a Redis.
const Addr = "127.0.0.1:6379"

// Resolve returns the URL to use and, when it started one, the embedded
// server (the caller closes it). resp2 is true for the embedded server.
func Resolve(log *slog.Logger) (url string, embedded *miniredis.Miniredis, err error) {
	if answers(Addr) {
		log.Info("development: using the Redis on " + Addr)
		return config.DefaultRedisURL, nil, nil
	}
	m := miniredis.NewMiniRedis()
	if err := m.StartAddr(Addr); err != nil {
		return "", nil, fmt.Errorf("devredis: no Redis answers on %s and the embedded one cannot start: %w", Addr, err)
	}
	log.Warn("DEVELOPMENT ONLY: started an embedded Redis-protocol server (miniredis) on " + Addr +
		"; set REDIS_URL to use a real Redis")
	return config.DefaultRedisURL, m, nil
}

// answers reports whether a Redis replies to PING at addr.
func answers(addr string) bool {
	c, err := net.DialTimeout("tcp", addr, 300*time.Millisecond)
	if err != nil {
		return false
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(500 * time.Millisecond))
	if _, err := c.Write([]byte("PING\r\n")); err != nil {
		return false
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	return err == nil && strings.HasPrefix(line, "+PONG")
}
