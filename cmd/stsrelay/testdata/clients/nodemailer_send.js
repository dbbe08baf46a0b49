// Submit one message with Nodemailer, as an application would.
//
// Reads a JSON request on stdin (see cmd/stsrelay/e2e_clients_test.go):
// host, port, secure (implicit TLS), tls_name (the name the relay's
// certificate carries; the connection goes to host, an IP address), cafile,
// user, password, from, to (list), subject, text, message_id, date, out.
//
// nodemailer is found through NODE_PATH, which the test points at the
// node_modules directory .ci/run installs it into. The message bytes
// Nodemailer streams to the server are copied to out, so that the test can
// compare them with what the MX received.
'use strict';

const fs = require('fs');
const { Transform } = require('stream');
const nodemailer = require('nodemailer');

const req = JSON.parse(fs.readFileSync(0, 'utf8'));

const transport = nodemailer.createTransport({
    host: req.host,
    port: req.port,
    secure: req.secure,
    requireTLS: !req.secure,
    name: 'client.test',
    auth: { user: req.user, pass: req.password },
    tls: { ca: [fs.readFileSync(req.cafile)], servername: req.tls_name },
    connectionTimeout: 10000,
    greetingTimeout: 10000,
    socketTimeout: 20000
});

const chunks = [];
transport.use('stream', (mail, done) => {
    mail.message.processFunc(input =>
        input.pipe(
            new Transform({
                transform(chunk, enc, cb) {
                    chunks.push(Buffer.from(chunk));
                    cb(null, chunk);
                }
            })
        )
    );
    done();
});

transport.sendMail(
    {
        from: req.from,
        to: req.to,
        subject: req.subject,
        text: req.text,
        messageId: req.message_id,
        date: req.date
    },
    (err, info) => {
        if (err) {
            console.error(err);
            process.exit(1);
        }
        fs.writeFileSync(req.out, Buffer.concat(chunks));
        console.log(info.response);
        transport.close();
    }
);
