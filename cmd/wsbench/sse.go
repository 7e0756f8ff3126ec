package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"
)

// openStream sends the event-stream request on c.nc, reads the response
// head and starts reading events (one goroutine per stream, as gws has one
// read loop per WebSocket).
func (c *benchConn) openStream(host, path, lastEventID string) error {
	var req strings.Builder
	fmt.Fprintf(&req, "GET %s HTTP/1.1\r\nHost: %s\r\nAccept: text/event-stream\r\n", path, host)
	if lastEventID != "" {
		fmt.Fprintf(&req, "Last-Event-ID: %s\r\n", lastEventID)
	}
	req.WriteString("\r\n")
	_ = c.nc.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.nc.Write([]byte(req.String())); err != nil {
		return err
	}
	r := bufio.NewReaderSize(c.nc, 4096)
	resp, err := http.ReadResponse(r, nil)
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		resp.Body.Close()
		return fmt.Errorf("handshake: status %d", resp.StatusCode)
	}
	_ = c.nc.SetDeadline(time.Time{})
	go c.readStream(r)
	return nil
}

// readStream hands each event's data to handle until the stream ends.
func (c *benchConn) readStream(r *bufio.Reader) {
	var data []byte
	code := 0
	for {
		line, err := r.ReadSlice('\n')
		if err != nil && !errors.Is(err, bufio.ErrBufferFull) {
			break
		}
		line = bytes.TrimRight(line, "\r\n")
		switch {
		case len(line) == 0:
			if data != nil {
				if bytes.HasPrefix(data, []byte(`{"event":"connection.closed"`)) {
					var ev struct {
						Data struct {
							Code int `json:"code"`
						} `json:"data"`
					}
					_ = json.Unmarshal(data, &ev)
					code = ev.Data.Code
				} else {
					c.handle(data)
				}
				data = nil
			}
		case bytes.HasPrefix(line, []byte("data: ")):
			if data != nil {
				data = append(data, '\n')
			}
			data = append(data, line[6:]...)
		}
	}
	_ = c.nc.Close()
	c.ended(code)
}
