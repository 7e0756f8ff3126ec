package notify

import (
	"strconv"
	"strings"
)

// Redis Cluster places a key by its hash tag: the part between the first
// "{" and the first "}" after it, when that part is not empty; else the
// whole name. A channel's keys must share its slot (the scripts SPUBLISH to
// the channel next to the keys), so their names start with a tag that
// hashes exactly as the channel does.

// hashTag is the "{…}" that starts the names of a channel's keys. For a
// channel without "}" (every user id without one: the names of every
// existing history) it is "{<channel>}", which hashes the whole channel as
// Redis does for the channel itself. A "}" would end that tag early (user
// "x{y}" gave "{ws:x{y}}:h", hashed by "ws:x{y", while the channel hashes
// by "y"): then it is "{<t>}<channel>", t a short tag without braces that
// hashes to the channel's slot, and the channel after it keeps the names
// apart.
func hashTag(channel string) string {
	if !strings.Contains(channel, "}") {
		return "{" + channel + "}"
	}
	return "{" + slotTag(keySlot(channel)) + "}" + channel
}

// keySlot is Redis Cluster's slot of a key or shard channel name.
func keySlot(name string) int {
	if i := strings.IndexByte(name, '{'); i >= 0 {
		if j := strings.IndexByte(name[i+1:], '}'); j > 0 {
			name = name[i+1 : i+1+j]
		}
	}
	return int(crc16(name) % 16384)
}

// slotTag is the first base-36 number that hashes to slot (about 16,000
// tries on average, only for channels with a "}").
func slotTag(slot int) string {
	for n := uint64(0); ; n++ {
		if t := strconv.FormatUint(n, 36); int(crc16(t)%16384) == slot {
			return t
		}
	}
}

// crc16 is CRC-16/XMODEM, the checksum Redis Cluster hashes with.
func crc16(s string) uint16 {
	var crc uint16
	for i := 0; i < len(s); i++ {
		crc ^= uint16(s[i]) << 8
		for range 8 {
			if crc&0x8000 != 0 {
				crc = crc<<1 ^ 0x1021
			} else {
				crc <<= 1
			}
		}
	}
	return crc
}
