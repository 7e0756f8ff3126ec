package gateway

import (
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// TestAsyncAPIDocumentsEveryCloseCodeAndEvent reads this package's source:
// every newReason(code, "ERROR_CODE", …) must be a row of the document's
// x-close-codes and an error_code enum value, and every eventFrame("name", …)
// a message name. A code or event added to the gateway without updating
// docs/asyncapi.yaml fails here.
func TestAsyncAPIDocumentsEveryCloseCodeAndEvent(t *testing.T) {
	doc, err := os.ReadFile("../../docs/asyncapi.yaml")
	if err != nil {
		t.Fatal(err)
	}
	text := string(doc)
	reasons, events := definedInSource(t)
	if len(reasons) < 13 || len(events) < 6 {
		t.Fatalf("source scan found %d close reasons and %d events: the scan is broken", len(reasons), len(events))
	}
	for _, r := range reasons {
		row := regexp.MustCompile(`\{ code: ` + strconv.Itoa(r.code) + `, error_code: ` + r.errorCode + `[,}]`)
		if !row.MatchString(text) {
			t.Errorf("close code %d %s is not in x-close-codes of docs/asyncapi.yaml", r.code, r.errorCode)
		}
		if !regexp.MustCompile(`enum: \[[^\]]*\b` + r.errorCode + `\b`).MatchString(text) {
			t.Errorf("error_code %s is not in the closeReason schema's enum", r.errorCode)
		}
	}
	for _, e := range events {
		if !strings.Contains(text, "name: "+e+"\n") {
			t.Errorf("system event %q has no message named %s in docs/asyncapi.yaml", e, e)
		}
	}
}

type sourceReason struct {
	code      int
	errorCode string
}

// definedInSource lists the literal arguments of newReason and eventFrame
// calls in the package's non-test files.
func definedInSource(t *testing.T) (reasons []sourceReason, events []string) {
	t.Helper()
	fset := token.NewFileSet()
	entries, err := os.ReadDir(".")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".go") || strings.HasSuffix(e.Name(), "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, e.Name(), nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		ast.Inspect(f, func(n ast.Node) bool {
			call, ok := n.(*ast.CallExpr)
			if !ok {
				return true
			}
			fn, ok := call.Fun.(*ast.Ident)
			if !ok || len(call.Args) < 1 {
				return true
			}
			switch fn.Name {
			case "newReason":
				code, _ := strconv.Atoi(call.Args[0].(*ast.BasicLit).Value)
				ec, _ := strconv.Unquote(call.Args[1].(*ast.BasicLit).Value)
				reasons = append(reasons, sourceReason{code, ec})
			case "eventFrame":
				if lit, ok := call.Args[0].(*ast.BasicLit); ok {
					name, _ := strconv.Unquote(lit.Value)
					events = append(events, name)
				}
			}
			return true
		})
	}
	return reasons, events
}
