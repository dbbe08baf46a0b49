// Package dnssec is a test kit for DANE (RFC 7672): a small DNSSEC-signed
// DNS tree on loopback and a real validating resolver (unbound) in front of
// it, so that the relay's resolver code sees AD bits, validated denials and
// bogus answers that a validator actually earned, not flags set by hand.
//
// # The tree
//
// A Server (NewServer) is one authoritative server, UDP and TCP on one free
// port of a loopback address the test picks. It serves every zone of the
// tree at once:
//
//	.                   root, always signed; its DNSKEY is the trust anchor
//	├── test.           Server.AddZone("test.", true)
//	│   ├── secure.test.    AddZone("secure.test.", true):  DS in test.
//	│   └── plain.test.     AddZone("plain.test.", false): NSEC in test.
//	│                       proves there is no DS, so it is provably insecure
//	└── ...
//
// AddZone puts the delegation in the parent (NS, glue for ns.<zone>, and a
// DS when the child is signed) and the apex records in the child (SOA, NS,
// DNSKEY). A zone's parent is the closest enclosing zone, whatever is added
// first; names between them are empty non-terminals of the parent. All
// records live in one table; the zone of a name is the deepest zone apex at
// or above it, except that DS at a zone apex belongs to the parent, as in
// real DNS. Records are added with Add("name ttl IN type rdata") or AddRR.
// Wildcards are not supported.
//
// # Signing and denial
//
// Signed zones have one ECDSAP256SHA256 key (flags 257, used as both KSK and
// ZSK) and are signed online: every RRset an answer carries gets a fresh
// RRSIG, valid from an hour ago to a day ahead. Denials use minimally covering
// NSEC records made on the fly (RFC 4470, "white lies"), so the answer is
// exactly what a validator needs and nothing more:
//
//   - NODATA: an NSEC owned by the query name, next name "\000.<qname>",
//     whose bitmap lists the types present (plus RRSIG and NSEC). At a
//     delegation seen from the parent the bitmap is NS (and DS if any), which
//     is how an unsigned child is proved insecure.
//   - NXDOMAIN: with CE the closest existing ancestor and NC the next label
//     down toward the query name, one NSEC from just before NC to just after
//     NC's subtree, and one from just before *.CE to just after it. Both
//     cover only non-existent names.
//
// plus the zone's SOA, all signed. The rcode of a CNAME chain is that of its
// last name; a chain is followed only inside one zone, and a resolver
// chases a target in another zone itself.
//
// Break(name, qtype) corrupts the signatures over that RRset (or over the
// denial of it), so a validator finds it bogus and answers SERVFAIL;
// ServFail(name, qtype) makes the server itself answer SERVFAIL; Restore
// undoes both.
//
// # The resolver, and why stubs
//
// StartUnbound runs unbound(8) as a child process on another loopback
// address, validating ("validator iterator") with the root DNSKEY as its only
// trust anchor. A delegation's NS addresses would make unbound query port 53,
// which needs root and a fixed port; instead every zone is configured as an
// unbound stub-zone with stub-addr ip@port of the Server. Stubs only tell
// unbound where to send queries: the chain of trust is still checked from the
// root down (DS from the parent, DNSKEY from the child), there is no
// domain-insecure and no permissive mode, and AD=1 comes only from a complete
// chain. Zones must therefore be added before StartUnbound is called.
//
// Caching is off (cache-max-ttl 0), so changes to records show at the next
// query. Validated keys are the exception: unbound keeps them, and bogus
// results, to the end of the current second (its clock counts whole
// seconds), so a change to a DNSKEY or DS shows after at most a second.
package dnssec
