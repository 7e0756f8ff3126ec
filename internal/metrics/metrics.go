// Package metrics defines the service's Prometheus collectors. Labels are
// bounded enumerations (reasons, results); never a user id or channel.
package metrics

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// Metrics holds every collector; one instance per process, registered on its
// own registry (no global state).
type Metrics struct {
	Registry *prometheus.Registry

	ActiveConnections   *prometheus.GaugeVec   // transport
	ConnectionsLimit    prometheus.Gauge       // WEBSOCKET_MAX_CONNECTIONS (0: none)
	ConnectionsOpened   *prometheus.CounterVec // transport
	ConnectionsRejected *prometheus.CounterVec // transport, reason
	ConnectionsClosed   *prometheus.CounterVec // transport, reason
	MessagesReceived    prometheus.Counter
	MessagesDelivered   prometheus.Counter
	MessagesDropped     *prometheus.CounterVec // reason
	Subscriptions       prometheus.Gauge
	JWTValidations      *prometheus.CounterVec // result
	DeliveryLatency     prometheus.Histogram
	RedisLinkUp         prometheus.Gauge
	RedisOutages        prometheus.Counter
	RedisLastOutage     prometheus.Gauge
	Resumes             *prometheus.CounterVec // outcome: complete or a resume.incomplete reason
	Replayed            prometheus.Counter
	Repairs             *prometheus.CounterVec // outcome: complete, incomplete
	Disconnects         prometheus.Counter
	RevocationChecks    *prometheus.CounterVec // outcome: ok, revoked, unavailable, held, confirmed, unchecked
}

// Transports, the values of the transport label.
const (
	TransportWebSocket = "websocket"
	TransportSSE       = "sse"
)

// Transports lists the transport label's values.
var Transports = []string{TransportWebSocket, TransportSSE}

// Drop reasons.
const (
	DropInvalidJSON  = "invalid_json"
	DropTooLarge     = "too_large"
	DropNoConnection = "no_connection"
	DropSlowConsumer = "slow_consumer"
	DropClosed       = "connection_closed"
)

// New creates and registers the collectors on a fresh registry.
func New() *Metrics {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	f := func(c prometheus.Collector) { reg.MustRegister(c) }
	m := &Metrics{
		Registry: reg,
		ActiveConnections: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "websocket_connections_active", Help: "Open client connections on this instance, by transport (websocket, sse)."}, []string{"transport"}),
		ConnectionsLimit: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "websocket_connections_limit", Help: "WEBSOCKET_MAX_CONNECTIONS of this instance (0: no limit)."}),
		ConnectionsOpened: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "websocket_connections_opened_total", Help: "Authenticated connections opened, by transport."}, []string{"transport"}),
		ConnectionsRejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "websocket_connections_rejected_total", Help: "Connections refused before or at once after the handshake, by transport and reason."}, []string{"transport", "reason"}),
		ConnectionsClosed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "websocket_connections_closed_total", Help: "Open connections closed, by transport and reason."}, []string{"transport", "reason"}),
		MessagesReceived: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "websocket_redis_messages_received_total", Help: "Messages received from Redis pub/sub."}),
		MessagesDelivered: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "websocket_messages_delivered_total", Help: "Messages written to WebSocket connections."}),
		MessagesDropped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "websocket_messages_dropped_total", Help: "Messages not delivered, by reason."}, []string{"reason"}),
		Subscriptions: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "websocket_redis_subscriptions_active", Help: "Redis channels subscribed by this instance."}),
		JWTValidations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "websocket_jwt_validations_total", Help: "Token validations, by result."}, []string{"result"}),
		DeliveryLatency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "websocket_delivery_latency_seconds",
			Help:    "Time from receipt from Redis to the write to the socket.",
			Buckets: []float64{.00005, .0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, 1}}),
		RedisLinkUp: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "websocket_redis_link_up", Help: "1 while the Redis pub/sub link is up and subscribed."}),
		RedisOutages: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "websocket_redis_outages_total", Help: "Times the Redis pub/sub link went down."}),
		RedisLastOutage: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "websocket_redis_last_outage_seconds", Help: "Duration of the last completed Redis outage."}),
		Resumes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "websocket_resumes_total", Help: "Connections opened with since, by outcome (complete or the resume.incomplete reason)."}, []string{"outcome"}),
		Replayed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "websocket_messages_replayed_total", Help: "History entries sent to connections (resume and repair)."}),
		Repairs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "websocket_repairs_total", Help: "Connections repaired from history after a Redis outage, by outcome."}, []string{"outcome"}),
		Disconnects: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "websocket_disconnect_commands_total", Help: "Disconnect control messages received for users with connections here."}),
		RevocationChecks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "websocket_revocation_checks_total", Help: "Token revocation lookups and decisions at handshake, after outages and for held sessions, by outcome (ok, revoked, unavailable, held, confirmed, unchecked)."}, []string{"outcome"}),
	}
	for _, c := range []prometheus.Collector{m.ActiveConnections, m.ConnectionsLimit, m.ConnectionsOpened, m.ConnectionsRejected,
		m.ConnectionsClosed, m.MessagesReceived, m.MessagesDelivered, m.MessagesDropped, m.Subscriptions,
		m.JWTValidations, m.DeliveryLatency, m.RedisLinkUp, m.RedisOutages, m.RedisLastOutage,
		m.Resumes, m.Replayed, m.Repairs, m.Disconnects, m.RevocationChecks} {
		f(c)
	}
	// Every known label value exists from the start, at 0: rate() and
	// alerts over a series that has not happened yet see 0, not nothing.
	m.Init(m.MessagesDropped, DropInvalidJSON, DropTooLarge, DropNoConnection, DropSlowConsumer, DropClosed)
	m.Init(m.JWTValidations, "valid", "invalid", "expired", "missing")
	m.Init(m.Repairs, "complete", "incomplete")
	m.Init(m.RevocationChecks, "ok", "revoked", "unavailable", "held", "confirmed", "unchecked")
	for _, t := range Transports {
		m.ActiveConnections.WithLabelValues(t)
		m.ConnectionsOpened.WithLabelValues(t)
	}
	return m
}

// Init creates the series of a one-label vector for each value, at 0.
func (m *Metrics) Init(v *prometheus.CounterVec, values ...string) {
	for _, val := range values {
		v.WithLabelValues(val)
	}
}

// LinkUp implements broker.Observer.
func (m *Metrics) LinkUp(up bool) {
	if up {
		m.RedisLinkUp.Set(1)
		return
	}
	m.RedisLinkUp.Set(0)
	m.RedisOutages.Inc()
}

// OutageEnded implements broker.Observer.
func (m *Metrics) OutageEnded(d time.Duration) { m.RedisLastOutage.Set(d.Seconds()) }

// SubscriptionsActive implements broker.Observer.
func (m *Metrics) SubscriptionsActive(n int) { m.Subscriptions.Set(float64(n)) }
