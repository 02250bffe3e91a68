-- Payloads on the console's dead-letter page (console.show_payloads), for {role}.
GRANT SELECT (payload) ON {schema}.messages TO {role};
