package sdnotify

import (
	"errors"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestNotify(t *testing.T) {
	path := filepath.Join(t.TempDir(), "notify.sock")
	ln, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	t.Setenv("NOTIFY_SOCKET", path)
	for _, tc := range []struct{ name, state, want string }{
		{"ready", Ready, "READY=1"},
		{"reloading carries MONOTONIC_USEC", Reloading, "RELOADING=1\nMONOTONIC_USEC="},
		{"stopping", Stopping, "STOPPING=1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := Notify(tc.state); err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 512)
			_ = ln.SetReadDeadline(time.Now().Add(5 * time.Second))
			n, err := ln.Read(buf)
			if err != nil {
				t.Fatal(err)
			}
			if got := string(buf[:n]); !strings.HasPrefix(got, tc.want) {
				t.Errorf("got %q, want prefix %q", got, tc.want)
			}
		})
	}
}

func TestNotifyWithoutSocket(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	if err := Notify(Ready); !errors.Is(err, ErrNoSocket) {
		t.Errorf("err = %v, want ErrNoSocket", err)
	}
}
