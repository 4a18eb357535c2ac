// A local OpenID Connect provider for the tests: npm's oidc-provider with three people.
// Started by tests/peers/oidc.py; everything comes from the environment:
//   OIDC_PORT, OIDC_CLIENT_ID, OIDC_CLIENT_SECRET, OIDC_REDIRECT_URI, and OIDC_PROVIDER_MODULE,
//   the file URL of the package scripts/bootstrap installed (an ES module resolves packages
//   from its own folder, not from the working directory).
// Sign-in is oidc-provider's development form (any password); consent is given for the one
// client, as a hospital's provider does for its own applications.
const { default: Provider } = await import(process.env.OIDC_PROVIDER_MODULE);

const port = Number(process.env.OIDC_PORT);
const issuer = `http://127.0.0.1:${port}`;

const PEOPLE = {
  rita: { name: 'Rita Reader', groups: ['pacsclip-radiologists'] },
  paul: { name: 'Paul Router', groups: ['pacsclip-pacs-admins', 'pacsclip-auditors'] },
  nora: { name: 'Nora Nogroup', groups: ['cafeteria'] },
};

const provider = new Provider(issuer, {
  clients: [{
    client_id: process.env.OIDC_CLIENT_ID,
    client_secret: process.env.OIDC_CLIENT_SECRET,
    redirect_uris: [process.env.OIDC_REDIRECT_URI],
    response_types: ['code'],
    grant_types: ['authorization_code'],
    token_endpoint_auth_method: 'client_secret_basic',
  }],
  pkce: { required: () => true },
  scopes: ['openid', 'profile', 'groups'],
  claims: { openid: ['sub'], profile: ['name', 'preferred_username'], groups: ['groups'] },
  // The person's claims in the ID token itself, as Entra and Keycloak send groups.
  conformIdTokenClaims: false,
  cookies: { keys: ['pacsclip-test-idp'] },
  features: { devInteractions: { enabled: true } },
  async findAccount(ctx, id) {
    const person = PEOPLE[id];
    if (!person) return undefined;
    return {
      accountId: id,
      async claims() {
        return { sub: id, name: person.name, preferred_username: id, groups: person.groups };
      },
    };
  },
  async loadExistingGrant(ctx) {
    const grant = new ctx.oidc.provider.Grant({
      clientId: ctx.oidc.client.clientId,
      accountId: ctx.oidc.session.accountId,
    });
    grant.addOIDCScope('openid profile groups');
    grant.addOIDCClaims(['name', 'preferred_username', 'groups']);
    await grant.save();
    return grant;
  },
});

provider.listen(port, '127.0.0.1', () => {
  console.log(`oidc-provider listening at ${issuer}`);
});
