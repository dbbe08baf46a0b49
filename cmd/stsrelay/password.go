package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"

	"golang.org/x/crypto/bcrypt"
)

// cmdHashPassword reads one password line on stdin and prints its bcrypt
// hash for submission.users.password_hash.
func cmdHashPassword(args []string) error {
	fs := flag.NewFlagSet("hash-password", flag.ContinueOnError)
	cost := fs.Int("cost", bcrypt.DefaultCost, "bcrypt cost")
	if err := fs.Parse(args); err != nil {
		return &usageError{err.Error()}
	}
	line, err := bufio.NewReader(os.Stdin).ReadString('\n')
	if err != nil && line == "" {
		return errors.New("hash-password: no password on standard input")
	}
	pw := strings.TrimRight(line, "\r\n")
	if pw == "" {
		return errors.New("hash-password: empty password")
	}
	if len(pw) > 72 {
		// bcrypt uses the first 72 bytes only; the relay refuses
		// longer passwords at AUTH.
		return fmt.Errorf("hash-password: password is %d bytes; bcrypt uses at most 72", len(pw))
	}
	h, err := bcrypt.GenerateFromPassword([]byte(pw), *cost)
	if err != nil {
		return fmt.Errorf("hash-password: %w", err)
	}
	fmt.Println(string(h))
	return nil
}
