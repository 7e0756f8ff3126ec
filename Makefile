.PHONY: run test build bench fuzz

run:            ## run the gateway with development defaults
	go run ./cmd/websocket-service

test:           ## every test, with -race (installs redis-server if missing)
	./scripts/test.sh

build:
	go build -o bin/ ./cmd/...

bench:          ## Go micro-benchmarks (hot path)
	go test -run '^$$' -bench . -benchmem ./...

fuzz:           ## each fuzzer for FUZZTIME (default 60s)
	./scripts/fuzz.sh
