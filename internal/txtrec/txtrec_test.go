package txtrec

import (
	"strings"
	"testing"
)

func TestValidExtName(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want bool
	}{
		{"a", true},
		{"x-ext_1.2", true},
		{"Z9", true},
		{strings.Repeat("a", 32), true},
		{strings.Repeat("a", 33), false},
		{"", false},
		{"-a", false},
		{"_a", false},
		{".a", false},
		{"a b", false},
		{"a=b", false},
		{"é", false},
	} {
		if got := ValidExtName(tt.in); got != tt.want {
			t.Errorf("ValidExtName(%q) = %v, want %v", tt.in, got, tt.want)
		}
	}
}
