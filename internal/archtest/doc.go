// Package archtest holds no code, only the test that enforces the import
// rules of docs/architecture.md over the module's packages (with go list).
// Nothing imports it, and it imports nothing of the module.
package archtest
