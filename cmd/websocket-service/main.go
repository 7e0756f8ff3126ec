// Command websocket-service is the HuleEdu real-time notification gateway
// and its operator tools (publish, token, listen).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

// version is set at build time with -ldflags "-X main.version=…".
var version = "dev"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	go func() { // a second signal exits at once
		<-ctx.Done()
		stop()
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
		<-sig
		fmt.Fprintln(os.Stderr, "second signal: exiting now")
		os.Exit(130)
	}()
	if err := run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr); err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(os.Stderr, "websocket-service:", err)
		}
		os.Exit(2)
	}
}

// run dispatches a subcommand; serve is the default.
func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	cmd := "serve"
	if len(args) > 0 && (args[0] == "-h" || args[0] == "--help" || args[0] == "help") {
		fmt.Fprint(stdout, usage)
		return nil
	}
	if len(args) > 0 && len(args[0]) > 0 && args[0][0] != '-' {
		cmd, args = args[0], args[1:]
	}
	switch cmd {
	case "serve":
		return serve(ctx, args, getenv, stderr)
	case "publish":
		return publish(ctx, args, getenv, stdout, stderr)
	case "token":
		return token(args, getenv, stdout, stderr)
	case "disconnect":
		return disconnect(ctx, args, getenv, stdout, stderr)
	case "listen":
		return listen(ctx, args, getenv, stdout, stderr)
	case "version":
		fmt.Fprintln(stdout, "websocket-service", version)
		return nil
	default:
		fmt.Fprint(stderr, usage)
		return fmt.Errorf("unknown command %q", cmd)
	}
}

const usage = `websocket-service: JWT-authenticated WebSockets fed by Redis pub/sub.

Usage:
  websocket-service [serve]        run the gateway (the default)
  websocket-service publish ...    publish a notification to a user's channel
  websocket-service token ...      mint a development token
  websocket-service disconnect ... close a user's sockets everywhere (4004), optionally revoke their tokens
  websocket-service listen ...     connect as a user and print each notification
  websocket-service version        print the version

Run "websocket-service <command> --help" for a command's flags and the
environment variables it reads.
`

// newFlagSet returns a FlagSet whose --help prints about and the variables.
func newFlagSet(name, about string, vars []string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: websocket-service %s [flags]\n\n%s\n\nFlags:\n", name, about)
		fs.PrintDefaults()
		if len(vars) > 0 {
			fmt.Fprintln(stderr, "\nEnvironment:")
			for _, v := range vars {
				fmt.Fprintln(stderr, "  "+v)
			}
		}
	}
	return fs
}
