"""What tests share besides fixtures: servers a test starts for itself (a platform instance,
Keycloak, Orthanc, a JWKS issuer), browsers, test volumes and an event reader. Conftests hold
only the fixtures, which call these."""
