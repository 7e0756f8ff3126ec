package notify

import "testing"

// TestKeySlot: Redis Cluster's own examples, and every key of a channel in
// the channel's slot, with names unchanged for channels without "}".
func TestKeySlot(t *testing.T) {
	if got := crc16("123456789"); got != 0x31C3 {
		t.Fatalf("crc16: %#x", got)
	}
	for name, want := range map[string]int{"foo": 12182, "{user1000}.following": keySlot("user1000"), "foo{}{bar}": keySlot("foo{}{bar}"), "foo{{bar}}zap": keySlot("{bar")} {
		if got := keySlot(name); got != want {
			t.Errorf("keySlot(%q) = %d, want %d", name, got, want)
		}
	}
	if keySlot("foo{}{bar}") != int(crc16("foo{}{bar}")%16384) {
		t.Error("an empty tag must hash the whole name")
	}
	for _, user := range []string{"u1", "p{q", "a}b{c", "x{y}", "}{", "{}", "}", "{", "{{}}", "ü{ß}"} {
		ch := Channel("ws", user)
		for _, key := range []string{HistoryKey(ch), MetaKey(ch), RevocationKey(ch), idempotencyKeyName(ch, "k")} {
			if keySlot(key) != keySlot(ch) {
				t.Errorf("%q: key %q in slot %d, channel in %d", user, key, keySlot(key), keySlot(ch))
			}
		}
	}
	if HistoryKey("ws:u1") != "{ws:u1}:h" || MetaKey("ws:p{q") != "{ws:p{q}:m" || RevocationKey("ws:u1") != "{ws:u1}:r" {
		t.Error("the names of channels without } changed")
	}
	if HistoryKey("ws:x{y}") == HistoryKey("ws:x{z}") {
		t.Error("two channels share a key")
	}
}
