package deploy_test

import (
	"context"
	"encoding/json"
	"log/slog"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/model/rulefmt"
	"github.com/prometheus/prometheus/promql"
	"github.com/prometheus/prometheus/promql/parser"
	"github.com/prometheus/prometheus/promql/promqltest"
)

// runbookBase is the documented base URL of every runbook_url
// (alerts.yaml's header, docs/operations.md "Alerts").
const runbookBase = "https://github.com/huleedu/websocket-service/blob/main/docs/operations.md"

// alertRules parses alerts.yaml with Prometheus's own rule parser.
func alertRules(t *testing.T) []rulefmt.Rule {
	t.Helper()
	groups, errs := rulefmt.Parse(read(t, "prometheus/alerts.yaml"), false, model.UTF8Validation, promParser, slog.New(slog.DiscardHandler))
	for _, err := range errs {
		t.Fatalf("alerts.yaml: %v", err)
	}
	var out []rulefmt.Rule
	for _, g := range groups.Groups {
		for _, r := range g.Rules {
			if r.Alert != "" {
				out = append(out, r)
			}
		}
	}
	return out
}

// alert is one firing alert: the rule's name and its labels (the series'
// labels plus the rule's).
type alert struct {
	name   string
	labels labels.Labels
}

// firing evaluates every alerting rule once a minute from 0 to end over the
// series of load (promqltest's load syntax, one sample a minute), with the
// rule manager's semantics: a series is pending from the first evaluation
// that returns it and firing once it has been returned without a gap for
// the rule's `for`. It returns the alerts firing at end.
func firing(t *testing.T, load string, end time.Duration) []alert {
	t.Helper()
	var body strings.Builder
	for _, line := range strings.Split(load, "\n") {
		if line = strings.TrimSpace(line); line != "" { // a blank line ends a load block
			body.WriteString("  " + line + "\n")
		}
	}
	st := promqltest.LoadedStorage(t, "load 1m\n"+body.String())
	defer st.Close()
	engine := promqltest.NewTestEngine(t, false, 5*time.Minute, promqltest.DefaultMaxSamplesPerQuery)
	var out []alert
	for _, r := range alertRules(t) {
		activeAt := map[string]time.Duration{} // series → first evaluation of its current run
		var last promql.Vector
		for ts := time.Duration(0); ts <= end; ts += time.Minute {
			q, err := engine.NewInstantQuery(context.Background(), st, nil, r.Expr, time.Unix(0, 0).Add(ts))
			if err != nil {
				t.Fatalf("%s: %v", r.Alert, err)
			}
			res := q.Exec(context.Background())
			if res.Err != nil {
				t.Fatalf("%s at %s: %v", r.Alert, ts, res.Err)
			}
			vec, err := res.Vector()
			if err != nil {
				t.Fatalf("%s: %v", r.Alert, err)
			}
			seen := map[string]bool{}
			for _, s := range vec {
				k := s.Metric.String()
				seen[k] = true
				if _, ok := activeAt[k]; !ok {
					activeAt[k] = ts
				}
			}
			for k := range activeAt {
				if !seen[k] {
					delete(activeAt, k)
				}
			}
			last = slices.Clone(vec)
			q.Close()
		}
		for _, s := range last {
			if end-activeAt[s.Metric.String()] >= time.Duration(r.For) {
				b := labels.NewBuilder(s.Metric)
				for k, v := range r.Labels {
					b.Set(k, v)
				}
				out = append(out, alert{r.Alert, b.Labels()})
			}
		}
	}
	return out
}

// The labels of the synthetic instance: a Kubernetes pod scraped by the
// PodMonitor (namespace, job, instance).
const inst = `namespace="prod",job="websocket-service",instance="10.0.0.1:8080"`

// healthy is an instance with nothing to report: scraped, linked to Redis,
// below its limit.
var healthy = strings.NewReplacer("L", inst).Replace(`
	up{L} 1x40
	websocket_redis_link_up{L} 1x40
	websocket_connections_limit{L} 50000x40
	websocket_connections_active{L,transport="websocket"} 1000x40
	websocket_connections_active{L,transport="sse"} 100x40
	websocket_connections_opened_total{L,transport="websocket"} 0+100x40
	websocket_connections_rejected_total{L,transport="websocket",reason="quota_exceeded"} 0+1x40
	websocket_jwt_validations_total{L,result="valid"} 0+100x40
	websocket_jwt_validations_total{L,result="expired"} 0+600x40
	websocket_delivery_latency_seconds_bucket{L,le="0.001"} 0+1000x40
	websocket_delivery_latency_seconds_bucket{L,le="0.1"} 0+1000x40
	websocket_delivery_latency_seconds_bucket{L,le="+Inf"} 0+1000x40
	process_open_fds{L} 1100x40
	process_max_fds{L} 1048576x40
	process_open_fds{namespace="prod",job="other-service",instance="10.0.0.9:9100"} 1000x40
	process_max_fds{namespace="prod",job="other-service",instance="10.0.0.9:9100"} 1024x40
`)

// TestAlertRules is `promtool test rules` in Go: each case loads synthetic
// series and checks which alerts fire after 30 minutes of evaluation.
func TestAlertRules(t *testing.T) {
	l := func(s string) string { return strings.ReplaceAll(s, "L", inst) }
	cases := []struct {
		name string
		load string
		want []string // alerts that must fire (no other may)
	}{
		{"healthy", healthy, nil},
		// Both transports count against WEBSOCKET_MAX_CONNECTIONS: 30k
		// sockets + 20k streams of 50k refuse every new client.
		{"websockets and streams at the limit", l(`
			up{L} 1x40
			websocket_redis_link_up{L} 1x40
			websocket_connections_limit{L} 50000x40
			websocket_connections_active{L,transport="websocket"} 30000x40
			websocket_connections_active{L,transport="sse"} 20000x40`), []string{"WebsocketConnectionsNearLimit"}},
		{"one instance crash-looping", healthy + `
			up{namespace="prod",job="websocket-service",instance="10.0.0.2:8080"} 0x40`, []string{"WebsocketInstanceDown"}},
		{"every instance down", l(`up{L} 0x40`), []string{"WebsocketServiceDown", "WebsocketInstanceDown"}},
		{"no target discovered", `process_open_fds{job="other-service"} 10x40`, []string{"WebsocketServiceAbsent"}},
		{"redis link down", healthy + l(`websocket_redis_link_up{L} 0x40`), []string{"WebsocketRedisLinkDown", "WebsocketDegradedSessions"}},
		{"redis flapping", healthy + l(`websocket_redis_outages_total{L} 0+1x40`), []string{"WebsocketRedisFlapping"}},
		{"slow consumers", healthy + l(`websocket_connections_closed_total{L,transport="websocket",reason="slow_consumer"} 0+60x40`), []string{"WebsocketSlowConsumerCloses"}},
		{"rate limited", healthy + l(`websocket_connections_closed_total{L,transport="sse",reason="rate_limited"} 0+60x40`), []string{"WebsocketRateLimitCloses"}},
		{"slow delivery", healthy + l(`
			websocket_delivery_latency_seconds_bucket{L,le="0.01"} 0+10x40
			websocket_delivery_latency_seconds_bucket{L,le="0.5"} 0+2000x40
			websocket_delivery_latency_seconds_bucket{L,le="+Inf"} 0+2000x40`), []string{"WebsocketDeliveryLatencyHigh"}},
		{"file descriptors", l(`
			up{L} 1x40
			websocket_redis_link_up{L} 1x40
			websocket_connections_limit{L} 0x40
			process_open_fds{L} 900x40
			process_max_fds{L} 1000x40`), []string{"WebsocketFileDescriptorsNearLimit"}},
		{"server busy", healthy + l(`websocket_connections_rejected_total{L,transport="websocket",reason="server_busy"} 0+100x40`), []string{"WebsocketHandshakeFailures"}},
		{"invalid tokens", healthy + l(`websocket_jwt_validations_total{L,result="invalid"} 0+600x40`), []string{"WebsocketAuthenticationFailures"}},
		{"revocation unchecked", healthy + l(`websocket_revocation_checks_total{L,outcome="unavailable"} 0+10x40`), []string{"WebsocketRevocationUnchecked"}},
		{"resumes trimmed", healthy + l(`websocket_resumes_total{L,outcome="trimmed"} 0+60x40`), []string{"WebsocketResumesIncomplete"}},
		{"bad payloads", healthy + l(`websocket_messages_dropped_total{L,reason="invalid_json"} 0+1x40`), []string{"WebsocketInvalidPayloads"}},
	}
	tested := map[string]bool{}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var got []string
			for _, a := range firing(t, c.load, 30*time.Minute) {
				name := a.name
				got = append(got, name)
				tested[name] = true
				// Routable per environment: the alert carries the
				// namespace and job of the instance (absent() has only
				// the job it looked for).
				if a.labels.Get("job") != "websocket-service" || (name != "WebsocketServiceAbsent" && a.labels.Get("namespace") != "prod") {
					t.Errorf("%s fired with labels %s: want namespace and job to route it", name, a.labels)
				}
			}
			slices.Sort(got)
			got = slices.Compact(got)
			want := slices.Clone(c.want)
			slices.Sort(want)
			if !slices.Equal(got, want) {
				t.Errorf("firing %v, want %v", got, want)
			}
		})
	}
	for _, r := range alertRules(t) {
		if !tested[r.Alert] {
			t.Errorf("alert %s: no case makes it fire", r.Alert)
		}
	}
}

// TestAlertRunbooks: every alert has a severity, a summary and an absolute
// runbook_url (base + "#" + lower-case name, what any receiver can open),
// and the runbook has the heading the anchor points to.
func TestAlertRunbooks(t *testing.T) {
	ops := string(read(t, "../docs/operations.md"))
	for _, r := range alertRules(t) {
		if want := runbookBase + "#" + strings.ToLower(r.Alert); r.Annotations["runbook_url"] != want {
			t.Errorf("alert %s: runbook_url %q, want %q", r.Alert, r.Annotations["runbook_url"], want)
		}
		if !strings.Contains(ops, "\n### "+r.Alert+"\n") {
			t.Errorf("docs/operations.md has no runbook heading \"### %s\"", r.Alert)
		}
		if r.Labels["severity"] == "" || r.Annotations["summary"] == "" {
			t.Errorf("alert %s without severity or summary", r.Alert)
		}
	}
	if !strings.Contains(ops, runbookBase) || !strings.Contains(string(read(t, "prometheus/alerts.yaml")), "sed -i 's|"+runbookBase) {
		t.Error("the runbook base URL is not documented as a parameter (alerts.yaml header, docs/operations.md)")
	}
}

// alertTableRow matches a row of docs/operations.md's "What to alert on"
// table: | `Alert` | `expr` | for | severity |.
var alertTableRow = regexp.MustCompile("(?m)^\\| `(Websocket[A-Za-z]+)` \\| `(.*)` \\| ([0-9a-z]+) \\| ([a-z]+) \\|$")

// TestOperationsAlertTable: the docs' alert table states exactly the
// shipped rules (expression, for, severity), one row each, so the two
// cannot disagree.
func TestOperationsAlertTable(t *testing.T) {
	ops := string(read(t, "../docs/operations.md"))
	rows := map[string][]string{}
	for _, m := range alertTableRow.FindAllStringSubmatch(ops, -1) {
		rows[m[1]] = m[2:]
	}
	space := regexp.MustCompile(`\s+`)
	for _, r := range alertRules(t) {
		row, ok := rows[r.Alert]
		if !ok {
			t.Errorf("docs/operations.md's alert table has no row for %s", r.Alert)
			continue
		}
		delete(rows, r.Alert)
		expr := strings.TrimSpace(space.ReplaceAllString(r.Expr, " "))
		if doc := strings.ReplaceAll(row[0], `\|`, "|"); doc != expr {
			t.Errorf("%s: docs say\n\t%s\nthe rule is\n\t%s", r.Alert, doc, expr)
		}
		forDur := "0s"
		if r.For != 0 {
			forDur = r.For.String()
		}
		if row[1] != forDur || row[2] != r.Labels["severity"] {
			t.Errorf("%s: docs say for %s, %s; the rule: for %s, %s", r.Alert, row[1], row[2], forDur, r.Labels["severity"])
		}
	}
	for name := range rows {
		t.Errorf("docs/operations.md's alert table has %s, which alerts.yaml does not", name)
	}
	if len(rows) == 0 && !strings.Contains(ops, "| alert | fires when | for | severity |") {
		t.Error("no alert table header")
	}
}

type dashboard struct {
	Panels []struct {
		Title       string `json:"title"`
		Description string `json:"description"`
		Targets     []struct {
			Expr         string `json:"expr"`
			LegendFormat string `json:"legendFormat"`
		} `json:"targets"`
	} `json:"panels"`
	Templating struct {
		List []struct {
			Name string `json:"name"`
		} `json:"list"`
	} `json:"templating"`
}

// TestDashboard: environments never mix (every query is filtered by the
// job and namespace variables), and the per-connection memory divides by
// all connections, WebSockets and streams together.
func TestDashboard(t *testing.T) {
	var d dashboard
	if err := json.Unmarshal(read(t, "grafana/websocket-service.json"), &d); err != nil {
		t.Fatal(err)
	}
	var vars []string
	for _, v := range d.Templating.List {
		vars = append(vars, v.Name)
	}
	for _, want := range []string{"job", "namespace", "instance"} {
		if !slices.Contains(vars, want) {
			t.Errorf("dashboard variables %v: no %s", vars, want)
		}
	}
	intervals := strings.NewReplacer("$__rate_interval", "5m", "$__interval", "1m")
	var perConn string
	for _, p := range d.Panels {
		for _, tg := range p.Targets {
			e, err := promParser.ParseExpr(intervals.Replace(tg.Expr))
			if err != nil {
				t.Fatalf("panel %q: %v", p.Title, err)
			}
			parser.Inspect(e, func(n parser.Node, _ []parser.Node) error {
				vs, ok := n.(*parser.VectorSelector)
				if !ok {
					return nil
				}
				for _, name := range []string{"namespace", "job", "instance"} {
					if !slices.ContainsFunc(vs.LabelMatchers, func(m *labels.Matcher) bool {
						return m.Name == name && m.Type == labels.MatchRegexp && m.Value == "$"+name
					}) {
						t.Errorf("panel %q selects %s without %s=~\"$%s\": environments mix", p.Title, vs.Name, name, name)
					}
				}
				return nil
			})
			if strings.Contains(tg.LegendFormat, "per connection") {
				perConn = tg.Expr
			}
		}
		if strings.Contains(p.Title, "WebSockets") && !strings.Contains(p.Title, "stream") {
			t.Errorf("panel %q counts WebSockets and SSE streams together", p.Title)
		}
	}
	if perConn == "" {
		t.Fatal("no RSS-per-connection query")
	}
	// 30k WebSockets + 20k streams in 100 MB: 2,000 bytes per connection.
	st := promqltest.LoadedStorage(t, `load 1m
  process_resident_memory_bytes{job="websocket-service",namespace="prod",instance="a"} 100000000x10
  websocket_connections_active{job="websocket-service",namespace="prod",instance="a",transport="websocket"} 30000x10
  websocket_connections_active{job="websocket-service",namespace="prod",instance="a",transport="sse"} 20000x10
`)
	defer st.Close()
	engine := promqltest.NewTestEngine(t, false, 5*time.Minute, promqltest.DefaultMaxSamplesPerQuery)
	all := strings.NewReplacer(`"$namespace"`, `".*"`, `"$job"`, `".*"`, `"$instance"`, `".*"`)
	q, err := engine.NewInstantQuery(context.Background(), st, nil, all.Replace(intervals.Replace(perConn)), time.Unix(300, 0))
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	vec, err := q.Exec(context.Background()).Vector()
	if err != nil || len(vec) != 1 || vec[0].F != 2000 {
		t.Errorf("RSS per connection over 30k WebSockets + 20k streams in 100 MB: got %v (%v), want 2000", vec, err)
	}
}
