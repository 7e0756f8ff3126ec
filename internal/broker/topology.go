package broker

import (
	"crypto/tls"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/redis/rueidis"
)

// Topology says where Redis is: exactly one of URL (standalone), Cluster
// (seed nodes) or Sentinel addresses with the master name.
type Topology struct {
	URL            string
	ClusterNodes   []string
	SentinelAddrs  []string
	SentinelMaster string
	Username       string // cluster/Sentinel nodes (a URL carries its own)
	Password       string
	TLS            bool
}

// Describe is a one-line description without credentials.
func (t Topology) Describe() string {
	switch {
	case len(t.ClusterNodes) > 0:
		return "cluster " + strings.Join(t.ClusterNodes, ",")
	case len(t.SentinelAddrs) > 0:
		return "sentinel " + t.SentinelMaster + "@" + strings.Join(t.SentinelAddrs, ",")
	default:
		return maskURL(t.URL)
	}
}

// ClientOption builds the rueidis options for the topology: no client-side
// cache, one command connection per node.
func (t Topology) ClientOption() (rueidis.ClientOption, error) {
	var co rueidis.ClientOption
	switch {
	case len(t.ClusterNodes) > 0:
		co.InitAddress = slices.Clone(t.ClusterNodes) // rueidis shuffles it in place
		co.ShuffleInit = true
	case len(t.SentinelAddrs) > 0:
		if t.SentinelMaster == "" {
			return co, errors.New("broker: sentinel master name is empty")
		}
		co.InitAddress = slices.Clone(t.SentinelAddrs)
		co.Sentinel = rueidis.SentinelOption{MasterSet: t.SentinelMaster}
	case t.URL != "":
		var err error
		if co, err = rueidis.ParseURL(t.URL); err != nil {
			return co, fmt.Errorf("broker: REDIS_URL: %w", err)
		}
	default:
		return co, errors.New("broker: no Redis address")
	}
	if t.URL == "" {
		co.Username, co.Password = t.Username, t.Password
		if t.TLS {
			co.TLSConfig = &tls.Config{MinVersion: tls.VersionTLS12}
		}
	}
	co.DisableCache = true
	co.PipelineMultiplex = -1
	co.Dialer.Timeout = 3 * time.Second
	return co, nil
}

func maskURL(raw string) string {
	if i := strings.Index(raw, "@"); i >= 0 {
		if j := strings.Index(raw, "://"); j >= 0 && j < i {
			return raw[:j+3] + "***@" + raw[i+1:]
		}
	}
	return raw
}
