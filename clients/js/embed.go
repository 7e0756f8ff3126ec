// Package websocketclient embeds the browser client library
// (@huleedu/websocket-client) so the gateway's development demo page serves
// the same module the npm package ships.
package websocketclient

import _ "embed"

// Module is src/index.js, the library's one ES module.
//
//go:embed src/index.js
var Module []byte
