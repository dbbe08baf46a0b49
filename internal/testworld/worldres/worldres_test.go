package worldres

import (
	"context"
	"slices"
	"testing"

	"github.com/stsrelay/stsrelay/internal/testworld"
)

func TestNewAsksTheWorld(t *testing.T) {
	w := testworld.New(t)
	w.DNS.SetTXT("_mta-sts.ex.test", []string{"v=STSv1; id=1;"})
	txts, err := New(t, w).LookupTXT(context.Background(), "_mta-sts.ex.test")
	if err != nil {
		t.Fatal(err)
	}
	if len(txts) != 1 || !slices.Equal(txts[0], []string{"v=STSv1; id=1;"}) {
		t.Fatalf("TXT = %q", txts)
	}
}
