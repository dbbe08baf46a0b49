// Package sdnotify implements the sender side of systemd's service
// notification protocol (sd_notify(3)): newline-separated VAR=VALUE
// assignments in one datagram to the AF_UNIX socket named by
// $NOTIFY_SOCKET. It lets a Type=notify unit report READY=1 once the
// service listens, RELOADING=1 around a reload and STOPPING=1 at
// shutdown.
//
// It is a few lines, so it is written here rather than taken from
// github.com/coreos/go-systemd/v22/daemon, which does the same (and no
// more than this program needs) behind an extra module.
package sdnotify

import (
	"errors"
	"net"
	"os"
	"strconv"
	"strings"
	"time"
)

// Standard assignments (sd_notify(3)).
const (
	Ready     = "READY=1"
	Reloading = "RELOADING=1"
	Stopping  = "STOPPING=1"
)

// ErrNoSocket is returned when $NOTIFY_SOCKET is unset: not started by
// systemd as Type=notify (or started by hand). Callers ignore it.
var ErrNoSocket = errors.New("sdnotify: NOTIFY_SOCKET not set")

// Notify sends state (one or more lines) to $NOTIFY_SOCKET. A name
// starting with '@' is an abstract socket (Linux). RELOADING=1 is sent
// with MONOTONIC_USEC, as systemd ≥ 253 asks for Type=notify-reload.
func Notify(state string) error {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return ErrNoSocket
	}
	if strings.HasPrefix(path, "@") {
		path = "\x00" + path[1:]
	}
	if strings.Contains(state, Reloading) {
		state += "\nMONOTONIC_USEC=" + strconv.FormatInt(monotonicUsec(), 10)
	}
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetWriteDeadline(time.Now().Add(time.Second))
	_, err = conn.Write([]byte(state))
	return err
}
