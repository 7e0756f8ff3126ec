package broker_test

import (
	"context"
	"testing"

	"github.com/huleedu/websocket-service/notify"
)

// TestRevokedAtSurvivesAKilledConnection: the History's command connection
// is killed (CLIENT KILL, as a proxy's idle cut would); the next revocation
// read still answers, on a fresh connection (issue 18, defect 1).
func TestRevokedAtSurvivesAKilledConnection(t *testing.T) {
	f := newHistoryFixture(t, notify.HistoryOptions{})
	if _, err := f.srv.Do("SET", notify.RevocationKey(notify.Channel("ws", "u")), "1700000000"); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if _, err := f.h.RevokedAt(context.Background(), []string{"u"}); err != nil { // dials
			t.Fatal(err)
		}
		if _, err := f.srv.Do("CLIENT", "KILL", "TYPE", "normal"); err != nil {
			t.Fatal(err)
		}
		at, err := f.h.RevokedAt(context.Background(), []string{"u", "other"})
		if err != nil || at[0] != 1700000000 || at[1] != 0 {
			t.Fatalf("RevokedAt after CLIENT KILL = %v, %v; want [1700000000 0]", at, err)
		}
	}
}
