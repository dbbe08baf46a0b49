package main

import "errors"

func cmdCheck(args []string) error {
	return errors.New("check: not available yet")
}
