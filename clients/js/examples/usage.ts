// Type-checked by `npm run typecheck` (tsc --noEmit): the README's usage.
import WebSocket from "ws";
import { NotificationClient, type Notification, type State, type Transport } from "@huleedu/websocket-client";

interface EssayGraded {
  essay_id: string;
  status: string;
}

const client = new NotificationClient({
  url: "wss://notifications.example.com",
  userId: "user-123",
  getToken: async () => "header.payload.signature",
  WebSocket, // Node; browsers use their own
  minDelayMs: 500,
  maxDelayMs: 30_000,
});

const off: () => void = client.on("notification", (n: Notification) => {
  if (n.event === "essay_status_updated") {
    const data = n.data as EssayGraded;
    console.log(data.essay_id, data.status, n.id);
  }
});
client.on("state", (s: State) => console.log("state", s));
client.on("resync", (info) => console.log("refetch state", info.reason));
client.on("error", (e) => console.error(e.code, e.errorCode, e.message));
client.on("transport", (t: Transport) => console.log("now over", t, client.transport));
client.connect();
const last: string | undefined = client.lastEventId;
console.log(last, client.state);
off();
client.close();
client.dispose();
