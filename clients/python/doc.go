// Package pythonclient is the Go side of the Python publisher
// (huleedu-websocket-publisher, in src/): its test installs the package into
// a virtual environment, type-checks it with mypy --strict and runs its
// pytest suite against real Redis topologies and the gateway binary, and
// checks that the Lua scripts it ships are notify's, byte for byte.
package pythonclient
