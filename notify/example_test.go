package notify_test

import (
	"context"
	"fmt"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/rueidis"

	"github.com/huleedu/websocket-service/notify"
)

// A backend service publishes an "essay graded" notification to a user.
// The count is the number of gateway instances subscribed to the user's
// channel (none here: this example has no gateway).
func ExamplePublisher_PublishUserNotification() {
	redis := miniredis.RunT(nopT{}) // stands in for REDIS_URL
	defer redis.Close()
	client, err := rueidis.NewClient(rueidis.ClientOption{InitAddress: []string{redis.Addr()}, DisableCache: true, AlwaysRESP2: true})
	if err != nil {
		panic(err)
	}
	defer client.Close()

	pub := notify.NewPublisher(client, notify.DefaultPrefix)
	receivers, err := pub.PublishUserNotification(context.Background(), "user-123", "essay_status_updated",
		map[string]string{"essay_id": "e-1", "status": "graded"})
	fmt.Println(notify.Channel(notify.DefaultPrefix, "user-123"), receivers, err)
	// Output: ws:user-123 0 <nil>
}

// nopT satisfies miniredis.Tester outside a test function.
type nopT struct{}

func (nopT) Fatalf(string, ...any) { panic("miniredis failed") }
func (nopT) Cleanup(func())        {}
func (nopT) Logf(string, ...any)   {}
