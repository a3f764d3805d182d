package lastlayer.harness;

import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.io.BufferedReader;
import java.io.FileDescriptor;
import java.io.FileOutputStream;
import java.io.InputStreamReader;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.util.concurrent.CountDownLatch;
import java.util.LinkedHashMap;
import java.util.Map;

import org.apache.hadoop.conf.Configuration;
import org.apache.hadoop.hdfs.HdfsConfiguration;
import org.apache.hadoop.security.UserGroupInformation;
import org.apache.hadoop.yarn.conf.YarnConfiguration;
import org.apache.hadoop.yarn.server.MiniYARNCluster;
import org.apache.hadoop.yarn.server.nodemanager.DefaultContainerExecutor;
import org.apache.hadoop.yarn.server.resourcemanager.scheduler.fifo.FifoScheduler;

/**
 * A Kerberized MiniYARNCluster (one ResourceManager, {@link #NODE_MANAGERS} NodeManagers) beside a
 * running {@link SecureHdfs}, in a JVM of its own, on the same KDC and HDFS.
 *
 * <p>Principals spelled out in full: {@code rm/localhost} (ResourceManager) and {@code nm/localhost}
 * (NodeManagers), both with {@code HTTP/localhost} for SPNEGO in {@code keytabs/yarn.keytab}.
 * MiniYARNCluster's daemons skip their own keytab login (their doSecureLogin is overridden) and serve
 * as the JVM's login user, which also renews the applications' HDFS delegation tokens: so this JVM
 * logs in as {@code rm/localhost} first (the HDFS JVM stays {@code hdfs/localhost}). Containers are
 * launched by the DefaultContainerExecutor (as this JVM's OS user; no setuid LinuxContainerExecutor
 * here). Everything binds to 127.0.0.1.
 *
 * <p>Arguments: {@code --dir STATE} (with {@code conf/core-site.xml}, {@code conf/hdfs-site.xml} of
 * the running HDFS and {@code keytabs/yarn.keytab}), {@code --realm LOCAL}, {@code --no-stdin}. Prints
 * {@code Ready!} and one JSON line, writes {@code conf/yarn-site.xml}; stops on EOF of stdin, on a
 * {@code stop} line or on SIGTERM.
 */
final class SecureYarn {

  static final int NODE_MANAGERS = 2;
  /**
   * Memory (MiB) and vcores each NodeManager offers: bookkeeping only (no memory checks), sized so
   * that a job-service task of the walkthrough's {@code worker.mem} 4096 fits beside an application
   * master.
   */
  static final int NM_MEMORY_MB = 8192;
  static final int NM_VCORES = 4;

  private final Path dir;
  private final String realm;
  private MiniYARNCluster cluster;

  SecureYarn(Path dir, String realm) {
    this.dir = dir;
    this.realm = realm;
  }

  String rmPrincipal() {
    return "rm/localhost@" + realm;
  }

  String nmPrincipal() {
    return "nm/localhost@" + realm;
  }

  String httpPrincipal() {
    return "HTTP/localhost@" + realm;
  }

  /** The YARN server configuration, layered on the secure HDFS one ({@code base}). */
  private YarnConfiguration serverConf(Configuration base) throws IOException {
    String keytab = dir.resolve("keytabs").resolve("yarn.keytab").toAbsolutePath().toString();
    if (!Files.isReadable(Paths.get(keytab))) {
      throw new IOException("yarn keytab not readable: " + keytab);
    }
    YarnConfiguration c = new YarnConfiguration(base);
    c.set(YarnConfiguration.RM_PRINCIPAL, rmPrincipal());
    c.set(YarnConfiguration.RM_KEYTAB, keytab);
    c.set(YarnConfiguration.NM_PRINCIPAL, nmPrincipal());
    c.set(YarnConfiguration.NM_KEYTAB, keytab);
    // SPNEGO on the RM and NM web endpoints (the RM swaps in its RMAuthenticationFilterInitializer).
    c.set("hadoop.http.filter.initializers",
        "org.apache.hadoop.security.AuthenticationFilterInitializer");
    c.set(YarnConfiguration.RM_WEBAPP_SPNEGO_USER_NAME_KEY, httpPrincipal());
    c.set(YarnConfiguration.RM_WEBAPP_SPNEGO_KEYTAB_FILE_KEY, keytab);
    c.set(YarnConfiguration.NM_WEBAPP_SPNEGO_USER_NAME_KEY, httpPrincipal());
    c.set(YarnConfiguration.NM_WEBAPP_SPNEGO_KEYTAB_FILE_KEY, keytab);
    c.set("hadoop.http.authentication.type", "kerberos");
    c.set("hadoop.http.authentication.kerberos.principal", httpPrincipal());
    c.set("hadoop.http.authentication.kerberos.keytab", keytab);
    c.set("hadoop.http.authentication.kerberos.name.rules", SecureHdfs.rules());
    c.setBoolean("hadoop.http.authentication.simple.anonymous.allowed", false);
    c.set("hadoop.http.authentication.signer.secret.provider", "random");
    c.set(YarnConfiguration.YARN_HTTP_POLICY_KEY, "HTTP_ONLY");
    // Loopback only.
    c.set(YarnConfiguration.RM_BIND_HOST, "127.0.0.1");
    c.set(YarnConfiguration.NM_BIND_HOST, "127.0.0.1");
    c.set(YarnConfiguration.RM_HOSTNAME, "localhost");
    // Containers: the default executor, no resource checks (Python workers live outside the JVM).
    c.setClass(YarnConfiguration.NM_CONTAINER_EXECUTOR, DefaultContainerExecutor.class,
        org.apache.hadoop.yarn.server.nodemanager.ContainerExecutor.class);
    c.setBoolean(YarnConfiguration.NM_PMEM_CHECK_ENABLED, false);
    c.setBoolean(YarnConfiguration.NM_VMEM_CHECK_ENABLED, false);
    c.setBoolean("yarn.nodemanager.disk-health-checker.enable", false);
    c.setInt(YarnConfiguration.NM_PMEM_MB, NM_MEMORY_MB);
    // MiniYARNCluster gives each NodeManager this one (default 4096), not NM_PMEM_MB.
    c.setInt(YarnConfiguration.YARN_MINICLUSTER_NM_PMEM_MB, NM_MEMORY_MB);
    c.setInt(YarnConfiguration.NM_VCORES, NM_VCORES);
    c.setInt(YarnConfiguration.RM_SCHEDULER_MINIMUM_ALLOCATION_MB, 128);
    c.setInt(YarnConfiguration.RM_SCHEDULER_MAXIMUM_ALLOCATION_MB, NM_MEMORY_MB);
    c.setClass(YarnConfiguration.RM_SCHEDULER, FifoScheduler.class,
        org.apache.hadoop.yarn.server.resourcemanager.scheduler.ResourceScheduler.class);
    // The RM's own stores on the local disk (fs.defaultFS is the HDFS, where rm may not write /).
    String local = dir.resolve("target").toAbsolutePath().toUri().toString();
    c.set("yarn.node-attribute.fs-store.root-dir", local + "node-attributes");
    c.set("yarn.node-labels.fs-store.root-dir", local + "node-labels");
    // No log aggregation: in secure mode a NodeManager reads the containers' logs through
    // SecureIOUtils, which needs Hadoop's native library (libhadoop), absent here ("Secure IO is not
    // possible without native code extensions"). The logs stay in the NodeManagers' log folders.
    // Keep finished containers' folders a while, so tests can inspect what was localized.
    c.setInt(YarnConfiguration.DEBUG_NM_DELETE_DELAY_SEC, 3600);
    c.setBoolean(YarnConfiguration.TIMELINE_SERVICE_ENABLED, false);
    c.setBoolean(YarnConfiguration.YARN_MINICLUSTER_FIXED_PORTS, false);
    c.setBoolean(YarnConfiguration.YARN_MINICLUSTER_USE_RPC, false);
    c.setInt(YarnConfiguration.RM_NM_HEARTBEAT_INTERVAL_MS, 500);
    c.setInt("yarn.nodemanager.health-checker.interval-ms", 1000);
    return c;
  }

  void start(Configuration base) throws Exception {
    YarnConfiguration conf = serverConf(base);
    UserGroupInformation.setConfiguration(conf);
    UserGroupInformation.loginUserFromKeytab(rmPrincipal(), conf.get(YarnConfiguration.RM_KEYTAB));
    // MiniYARNCluster keeps its NodeManagers' folders under ./target (the harness's cwd: dir).
    cluster = new MiniYARNCluster("yarn", 1, NODE_MANAGERS, 1, 1);
    cluster.init(conf);
    cluster.start();
    long deadline = System.nanoTime() + 120_000_000_000L;
    while (!cluster.waitForNodeManagersToConnect(1000)) {
      if (System.nanoTime() > deadline) {
        throw new IOException("NodeManagers did not register within 120 s");
      }
    }
    writeClientConf();
  }

  Configuration conf() {
    return cluster.getConfig();
  }

  /** The client configuration {@code <dir>/conf/yarn-site.xml}. */
  void writeClientConf() throws IOException {
    Configuration live = cluster.getConfig();
    Configuration yarn = new Configuration(false);
    for (String key : new String[] {
        YarnConfiguration.RM_ADDRESS, YarnConfiguration.RM_SCHEDULER_ADDRESS,
        YarnConfiguration.RM_RESOURCE_TRACKER_ADDRESS, YarnConfiguration.RM_ADMIN_ADDRESS,
        YarnConfiguration.RM_WEBAPP_ADDRESS}) {
      yarn.set(key, "localhost:" + live.getSocketAddr(key, "127.0.0.1:0", 0).getPort());
    }
    yarn.set(YarnConfiguration.RM_HOSTNAME, "localhost");
    yarn.set(YarnConfiguration.RM_PRINCIPAL, rmPrincipal());
    yarn.set(YarnConfiguration.NM_PRINCIPAL, nmPrincipal());
    yarn.set(YarnConfiguration.RM_WEBAPP_SPNEGO_USER_NAME_KEY, httpPrincipal());
    yarn.set(YarnConfiguration.YARN_HTTP_POLICY_KEY, "HTTP_ONLY");
    yarn.set(YarnConfiguration.RM_SCHEDULER_MINIMUM_ALLOCATION_MB, "128");
    yarn.set(YarnConfiguration.RM_SCHEDULER_MAXIMUM_ALLOCATION_MB, String.valueOf(NM_MEMORY_MB));
    yarn.set(YarnConfiguration.TIMELINE_SERVICE_ENABLED, "false");
    // What applications' containers put on their class path (skein's application master): there is
    // no Hadoop installation (HADOOP_*_HOME) here, so this JVM's own class path (the client
    // configuration folder, the harness jar and its lib/ of Hadoop jars) stands in for it.
    yarn.set(YarnConfiguration.YARN_APPLICATION_CLASSPATH, System.getProperty("java.class.path"));
    SecureHdfs.writeXml(yarn, dir.resolve("conf").resolve("yarn-site.xml"));
  }

  int rmPort() {
    return cluster.getConfig().getSocketAddr(YarnConfiguration.RM_ADDRESS, "127.0.0.1:0", 0).getPort();
  }

  int rmWebPort() {
    return cluster.getConfig()
        .getSocketAddr(YarnConfiguration.RM_WEBAPP_ADDRESS, "127.0.0.1:0", 0).getPort();
  }

  /** Ports and folders of the running cluster, for {@code info}. */
  Map<String, Object> info() {
    Map<String, Object> m = new LinkedHashMap<>();
    m.put("rm_port", rmPort());
    m.put("rm_web_port", rmWebPort());
    m.put("rm_principal", rmPrincipal());
    m.put("nm_principal", nmPrincipal());
    m.put("nm_local_dirs", cluster.getNodeManager(0).getConfig().get(YarnConfiguration.NM_LOCAL_DIRS));
    m.put("nm_log_dirs", cluster.getNodeManager(0).getConfig().get(YarnConfiguration.NM_LOG_DIRS));
    return m;
  }

  synchronized void stop() {
    if (cluster != null) {
      cluster.stop();
      cluster = null;
    }
  }

  /** The HDFS client configuration of the running SecureHdfs ({@code <dir>/conf}). */
  static Configuration hdfsConf(Path dir) throws IOException {
    Configuration c = new HdfsConfiguration();
    for (String name : new String[] {"core-site.xml", "hdfs-site.xml"}) {
      Path file = dir.resolve("conf").resolve(name);
      if (!Files.isReadable(file)) {
        throw new IOException("no " + file + ": start the secure HDFS first");
      }
      c.addResource(new org.apache.hadoop.fs.Path(file.toUri()));
    }
    return c;
  }

  public static void main(String[] args) throws Exception {
    PrintStream proto = new PrintStream(new FileOutputStream(FileDescriptor.out), true,
        StandardCharsets.UTF_8);
    System.setOut(System.err);
    String dirArg = null;
    String realm = "LOCAL";
    boolean readStdin = true;
    for (int i = 0; i < args.length; i++) {
      switch (args[i]) {
        case "--dir": dirArg = args[++i]; break;
        case "--realm": realm = args[++i]; break;
        case "--no-stdin": readStdin = false; break;
        default:
          System.err.println("usage: SecureYarn --dir STATE [--realm LOCAL] [--no-stdin]");
          System.exit(64);
      }
    }
    if (dirArg == null || System.getProperty("java.security.krb5.conf") == null) {
      System.err.println("error --dir and -Djava.security.krb5.conf are required");
      System.exit(64);
    }
    Path dir = Paths.get(dirArg).toAbsolutePath();
    SecureYarn y = new SecureYarn(dir, realm);
    Runtime.getRuntime().addShutdownHook(new Thread(y::stop, "secureyarn-shutdown"));
    long t0 = System.nanoTime();
    try {
      y.start(hdfsConf(dir));
    } catch (Throwable t) {
      t.printStackTrace();
      proto.println("error start " + SecureHdfs.oneLine(t));
      y.stop();
      System.exit(2);
    }
    System.err.printf("Secure MiniYARNCluster up in %.1f s%n", (System.nanoTime() - t0) / 1e9);
    Map<String, Object> info = y.info();
    info.put("pid", ProcessHandle.current().pid());
    proto.println("Ready!");
    proto.println(SecureHdfs.json(info));
    CountDownLatch done = new CountDownLatch(1);
    if (readStdin) {
      Thread t = new Thread(() -> {
        try (BufferedReader in = new BufferedReader(
            new InputStreamReader(System.in, StandardCharsets.UTF_8))) {
          String line;
          while ((line = in.readLine()) != null && !line.strip().equals("stop")) {
            proto.println("error unknown command: " + line.strip());
          }
        } catch (IOException e) {
          System.err.println("stdin: " + SecureHdfs.oneLine(e));
        }
        done.countDown();
      }, "secureyarn-stdin");
      t.setDaemon(true);
      t.start();
    }
    done.await();
    y.stop();
    System.err.println("SecureYarn stopped");
    System.exit(0);
  }
}
